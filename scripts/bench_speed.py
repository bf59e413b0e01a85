#!/usr/bin/env python
"""Frozen towers at the speed of the hardware (issue 11): CPU benchmark of eval encoding, CoOp steps, memory.

Random weights only (timing and memory; never results): ``load_clip(name, "openai",
load_weights=False)`` builds the OpenAI architecture (QuickGELU) with random weights.

Parts (``--parts``, each in a fresh subprocess so Accelerate state and RSS start clean):

* ``eval``  bf16 matmul peak (4096³, measured before, between and after the rounds) and
  ``encode_image`` of ``--eval-batch`` images under ``torch.inference_mode``: fp32 weights under
  bf16 autocast (the previous path) vs the tower held in bf16
  (:func:`backmix_vlm.models.frozen.hold_frozen_in`), interleaved rounds; images/s and % of the
  peak (FLOPs of one image counted from the architecture, ``bench_coop.vit_image_flops``).
  Also the fast path's accuracy against the fp32 forward (per-sample cosine, zero-shot argmax
  agreement against random class embeddings).  ``--workers N``: also the batch split over N
  single-threaded worker threads (``run.eval_workers``), with ``--compile`` also compiled so.
* ``coop``  one training step at batch ``--batch`` (bf16), interleaved rounds, same weights and
  images:
    official     a faithful re-implementation of the official CoOp step (KaiyangZhou/CoOp
                 ``trainers/coop.py``: PromptLearner, TextEncoder, CustomCLIP over OpenAI's CLIP
                 forward — fp32 weights, seq-first blocks, fp32 LayerNorm — run as Dassl's
                 ``forward_backward`` with ``PREC=amp``: autocast, CE, SGD step; bf16 autocast on
                 CPU, so no GradScaler)
    plain        ours: ``Trainer.train_step`` + ``AdapterTask`` over ``CoOp``, base held in bf16
    plain2x      ours, no mixing, on the doubled batch (2B images)
    backmix      ours, BackMix alongside (B originals + B mixed), bank update every step
                 (``saliency.reuse_forward``, start_layer -1)
  Ratios are medians of per-round ratios (official / plain, backmix / plain2x).
* ``memory`` peak RSS growth of one BackMix training step (VPT with the map from the training
  backward, CoOp with the reuse-forward tail), start_layer -1 and 0, for ViT-B/16 at batch 64
  and ViT-L/14 at batch 16, bf16: with explicit attention only in the relevance window (now)
  and in every block (``legacy``: what the recording did before).  Slow (minutes per step on
  2 cores); run it nice'd.

    python scripts/bench_speed.py --parts eval coop --out bench_speed.json
    nice -n 10 python scripts/bench_speed.py --parts memory --out bench_memory.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coop import CLASSES, PeakRSS, _Sized, _timed, machine_info, vit_image_flops  # noqa: E402
from backmix_vlm.runtime import machine_line  # noqa: E402

BF16 = torch.bfloat16
CLOCKS = ("cpu", "wall")


def measure(fn: Any) -> dict[str, float]:
    """Wall seconds and CPU seconds of this process for one call of ``fn``.

    On a machine shared with other jobs the wall time mostly measures how much of a core the
    scheduler gave us; the process CPU time (all threads) measures the work, so ratios are
    taken on CPU time (with ``--threads 1`` it is also the wall time of an idle core).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def matmul_bf16(n: int = 4096, reps: int = 3) -> dict[str, float]:
    """GFLOP/s of an n³ bf16 matmul per clock (best of ``reps``)."""
    a, b = torch.randn(n, n, dtype=BF16), torch.randn(n, n, dtype=BF16)
    torch.matmul(a, b)
    runs = [measure(lambda: torch.matmul(a, b)) for _ in range(reps)]
    return {c: 2 * n ** 3 / min(r[c] for r in runs) / 1e9 for c in CLOCKS}


# ----------------------------------------------------------------------------- official CoOp (re-implementation)
class OfficialCoOp(nn.Module):
    """The computation of KaiyangZhou/CoOp ``CustomCLIP`` (trainers/coop.py) over OpenAI's CLIP forward.

    ``clip`` is an open_clip CLIP with OpenAI's architecture in fp32; its modules are used with
    OpenAI CLIP's own forward (clip/model.py): seq-first (LND) blocks
    ``x + attn(ln_1(x)); x + mlp(ln_2(x))`` with ``nn.MultiheadAttention(need_weights=False)``
    and the causal mask cast to the activations' dtype, LayerNorm computed in fp32 and cast back.
    PromptLearner: generic context of ``n_ctx`` tokens ~ N(0, 0.02²), class token at the end,
    prefix / suffix token embeddings as buffers.  Only ``ctx`` trains.
    """

    def __init__(self, clip: nn.Module, tokenizer: Any, classnames: list[str], n_ctx: int = 16) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        for tower in (clip.visual.transformer, clip.transformer):  # OpenAI's blocks take (L, N, D)
            tower.batch_first = False
            for block in tower.resblocks:
                block.attn.batch_first = False
        width = clip.ln_final.weight.shape[0]
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))
        prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
        self.register_buffer("tokenized", tokenizer(prompts), persistent=False)
        with torch.no_grad():
            embedding = clip.token_embedding(self.tokenized)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:], persistent=False)
        self.mask = torch.empty(clip.context_length, clip.context_length).fill_(float("-inf")).triu_(1)

    @staticmethod
    def _ln(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:  # OpenAI's LayerNorm: fp32, then back
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps).type(x.dtype)

    def _block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self._attention(block, x, mask)
        return x + block.mlp(self._ln(block.ln_2, x))  # c_fc -> QuickGELU -> c_proj

    def _attention(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        mask = mask.to(dtype=x.dtype, device=x.device) if mask is not None else None
        h = self._ln(block.ln_1, x)
        return block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]

    def image_encoder(self, x: torch.Tensor) -> torch.Tensor:
        v = self.clip.visual
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = self._ln(v.ln_pre, x).permute(1, 0, 2)  # NLD -> LND
        for block in v.transformer.resblocks:
            x = self._block(block, x, None)
        x = self._ln(v.ln_post, x.permute(1, 0, 2)[:, 0, :])
        return x @ v.proj

    def prompt_learner(self) -> torch.Tensor:
        ctx = self.ctx.unsqueeze(0).expand(len(self.tokenized), -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)

    def text_encoder(self, prompts: torch.Tensor) -> torch.Tensor:
        c = self.clip
        x = (prompts + c.positional_embedding).permute(1, 0, 2)  # NLD -> LND
        for block in c.transformer.resblocks:
            x = self._block(block, x, self.mask)
        x = self._ln(c.ln_final, x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), self.tokenized.argmax(dim=-1)] @ c.text_projection

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image_features = self.image_encoder(image)
        text_features = self.text_encoder(self.prompt_learner())
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image_features @ text_features.t()


def official_step(model: OfficialCoOp, optim: torch.optim.Optimizer, image: torch.Tensor, label: torch.Tensor) -> float:
    """Dassl ``forward_backward`` with ``PREC=amp`` (bf16 autocast on CPU: no GradScaler needed)."""
    with torch.autocast("cpu", dtype=BF16):
        output = model(image)
        loss = F.cross_entropy(output, label)
    optim.zero_grad()
    loss.backward()
    optim.step()
    return loss.item()


# ----------------------------------------------------------------------------- part: eval
def skipped_by_class_token_only(visual: nn.Module) -> float:
    """FLOPs of the last block that :func:`class_token_only` does not compute (queries, attention
    rows, out-projection and MLP of every token but the class token)."""
    gh, gw = visual.grid_size
    tokens, width = gh * gw + 1, visual.conv1.out_channels
    hidden = visual.transformer.resblocks[-1].mlp.c_fc.out_features
    rest = tokens - 1
    return 2.0 * (rest * width * width + 2 * rest * tokens * width + rest * width * width + 2 * rest * width * hidden)


def load_model(name: str, seed: int) -> Any:
    """Random-weight CLIP: the OpenAI architecture of ``name`` (QuickGELU), or the tiny test CLIP."""
    from backmix_vlm.models.clip import TINY_CLIP, load_clip

    torch.manual_seed(seed)
    return load_clip(name, None if name == TINY_CLIP else "openai", load_weights=False)


class _ShardedEncode(nn.Module):
    """``model.encode_image`` with its batches split over single-threaded workers (``run.eval_workers``)."""

    def __init__(self, model: nn.Module, workers: int) -> None:
        from backmix_vlm.models.frozen import shard_batches

        super().__init__()
        self.model = model
        shard_batches(self, workers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


def part_eval(args: argparse.Namespace) -> dict[str, Any]:
    from backmix_vlm.models.clip import load_clip
    from backmix_vlm.models.frozen import class_token_only, hold_frozen_in

    bundle = load_model(args.model, args.seed)
    fp32 = bundle.model
    held = copy.deepcopy(fp32)
    hold_frozen_in(held, BF16)
    flops = vit_image_flops(fp32.visual)
    size = int(bundle.image_size)
    images = torch.randn(args.eval_batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    cls_only = "held, last block for the class token only (CoOp / zero-shot path)"
    variants = {"fp32 weights, bf16 autocast": fp32, "held in bf16 (+ autocast)": held, cls_only: held}
    work_per_image = {name: flops for name in variants}
    work_per_image[cls_only] = flops - skipped_by_class_token_only(fp32.visual)
    compile_s = None
    full_warmup: set[str] = set()  # variants compiled / sharded for the full batch shape: round 0 uses it too
    if args.compile:  # zero-shot with run.compile: the held tower's forward under torch.compile
        from backmix_vlm.models.frozen import compile_frozen_tower

        compiled_name = "held, torch.compile (zero-shot run.compile)"
        compiled = compile_frozen_tower(copy.deepcopy(held))
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            compiled.encode_image(images)  # compiles for this batch shape (the rounds reuse it)
        compile_s = time.perf_counter() - start
        log(f"[eval] compile {compile_s:.0f} s")
        variants[compiled_name] = compiled
        work_per_image[compiled_name] = flops
        full_warmup.add(compiled_name)
    if args.workers >= 2:  # run.eval_workers: the batch split over single-threaded worker threads
        shard_names = [f"held, {args.workers} single-threaded shards (run.eval_workers)"]
        variants[shard_names[0]] = _ShardedEncode(held, args.workers)
        if args.compile:
            from backmix_vlm.models.frozen import compile_frozen_tower

            shard_names.append(f"held, torch.compile, {args.workers} single-threaded shards")
            variants[shard_names[1]] = _ShardedEncode(compile_frozen_tower(copy.deepcopy(held)), args.workers)
        full_warmup.update(shard_names)
        for name in shard_names:
            work_per_image[name] = flops
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
                variants[name].encode_image(images)  # first call: shards one after the other (a compile: 1 thread)
            log(f"[eval] warm-up {name} {time.perf_counter() - start:.0f} s")
    times: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    peaks = [matmul_bf16()]
    with torch.inference_mode():
        for r in range(1 + args.reps):
            names = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in names:
                with torch.autocast("cpu", dtype=BF16), class_token_only(held) if name == cls_only else nullcontext():
                    warm = images if name in full_warmup else images[:2]  # no second compile
                    t = measure(lambda: variants[name].encode_image(warm if r == 0 else images))
                if r:
                    times[name].append(t)
            peaks.append(matmul_bf16())
            log(f"[eval] round {r}: " + ", ".join(f"{k} {v[-1]['cpu']:.2f} cpu-s / {v[-1]['wall']:.2f} s"
                                                  for k, v in times.items() if v) + f"; peak {peaks[-1]}")
        # accuracy of the fast path against the fp32 forward (no autocast)
        ref = fp32.encode_image(images)
        with torch.autocast("cpu", dtype=BF16):
            fast = held.encode_image(images).float()
    text = F.normalize(torch.randn(10, ref.shape[1], generator=torch.Generator().manual_seed(1)), dim=-1)
    agree = ((F.normalize(ref, dim=-1) @ text.T).argmax(1) == (F.normalize(fast, dim=-1) @ text.T).argmax(1))
    cos = F.cosine_similarity(ref, fast, dim=-1)
    rows: dict[str, Any] = {}
    for clock in CLOCKS:
        peak = statistics.median(p[clock] for p in peaks)
        for name, ts in times.items():
            work = args.eval_batch * work_per_image[name] / 1e9  # FLOPs actually computed
            med = statistics.median(t[clock] for t in ts)
            rows.setdefault(name, {})[clock] = {
                "median_s": med, "images_per_s": args.eval_batch / med, "gflops": work / med, "peak_gflops": peak,
                "pct_of_peak": 100 * work / med / peak,
                # each round against the peak measured right after it
                "pct_of_peak_per_round": [100 * work / t[clock] / p[clock] for t, p in zip(ts, peaks[1:])]}
    return {"batch": args.eval_batch, "compile_s": compile_s, "flops_per_image": flops, "work_per_image": work_per_image, "matmul_bf16_gflops": peaks,
            "times": times, "summary": rows,
            "accuracy": {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "argmax_agreement": float(agree.float().mean()),
                         "n": len(cos)}}


# ----------------------------------------------------------------------------- part: coop
def part_coop(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from backmix_vlm.adapters import CoOp
    from backmix_vlm.augment import build_mixer
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.models.clip import load_clip
    from backmix_vlm.models.frozen import hold_frozen_in

    bundle = load_model(args.model, args.seed)
    size = int(bundle.image_size)
    official = OfficialCoOp(copy.deepcopy(bundle.model), bundle.tokenizer, CLASSES)
    official_opt = torch.optim.SGD([official.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    hold_frozen_in(bundle.model, BF16)  # what the fewshot runner does for run.precision=bf16
    adapter = CoOp(bundle, CLASSES)
    with torch.no_grad():
        adapter.ctx.copy_(official.ctx)  # same context, same weights, same images
    b = args.batch
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(2 * b, 3, size, size, generator=g)
    labels = torch.randint(0, len(CLASSES), (2 * b,), generator=g)
    indices = torch.arange(2 * b)
    run_dir = tempfile.mkdtemp(prefix="bench_speed_")
    views = None
    if args.views != "none":  # the fewshot job's device views (RandomResizedCrop + flip), frame-consistent bank
        from backmix_vlm.augment.geometry import train_pipeline
        from backmix_vlm.config import ViewsConfig

        _, views = train_pipeline(ViewsConfig(name=args.views), size, bundle.mean, bundle.std)
    trainers = {}
    for name, augment in (("plain", "none"), ("plain2x", "none"), ("backmix", "backmix")):
        task = AdapterTask(adapter, size, SaliencyConfig(start_layer=-1, reuse_forward=True), "bf16")
        trainers[name] = Trainer(task, _Sized(2 * b), optim=OptimConfig(lr=0.002, batch_size=b, epochs=1),
                                 run=RunConfig(device="cpu", precision="bf16", seed=args.seed), run_dir=run_dir,
                                 num_classes=len(CLASSES), mixer=build_mixer(augment), backmix=BackMixConfig(), views=views)

    def step(name: str, n: int) -> None:
        if name == "official":
            official_step(official, official_opt, images[:n], labels[:n])
        else:
            rows = 2 * n if name == "plain2x" else n
            trainers[name].train_step(images[:rows], labels[:rows], indices[:rows])

    names = ["official", "plain", "plain2x", "backmix"]
    times: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    for r in range(1 + args.reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = measure(lambda: step(name, 2 if r == 0 else b))
            if r:
                times[name].append(t)
        if r:
            log(f"[coop] round {r}: " + ", ".join(f"{k} {v[-1]['cpu']:.2f} cpu-s / {v[-1]['wall']:.2f} s"
                                                  for k, v in times.items()))
    out: dict[str, Any] = {"batch": b, "views": args.views, "times": times, "summary": {}, "ratios": {}}
    for clock in CLOCKS:
        for name, ts in times.items():
            med = statistics.median(t[clock] for t in ts)
            out["summary"].setdefault(name, {})[clock] = {
                "median_s": med, "images_per_s": (2 * b if name in ("plain2x", "backmix") else b) / med}  # forwarded images
        for key, (num, den) in {"plain_speedup_over_official": ("official", "plain"),
                                "backmix_over_plain2x": ("backmix", "plain2x")}.items():
            per_round = [n[clock] / d[clock] for n, d in zip(times[num], times[den])]
            out["ratios"].setdefault(key, {})[clock] = {"median": statistics.median(per_round), "per_round": per_round}
    return out


# ----------------------------------------------------------------------------- part: memory
MEMORY_CASES = [("ViT-B-16", 64), ("ViT-L-14", 16)]


def memory_worker(model_name: str, batch: int, method: str, start_layer: int, legacy: bool, seed: int) -> dict[str, Any]:
    """Peak RSS growth of one bf16 BackMix step (alongside: 2B rows) with the attention map."""
    import resource
    import tempfile

    from backmix_vlm.adapters import create_adapter
    from backmix_vlm.augment import build_mixer
    from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
    from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
    from backmix_vlm.engine.trainer import Trainer
    from backmix_vlm.models.clip import load_clip
    from backmix_vlm.models.frozen import hold_frozen_in
    from backmix_vlm.saliency import relevance

    if legacy:  # every block explicit, as the recording / separate pass did before issue 11
        original = relevance.explicit_attention

        def every_block(blocks: Any, record: Any, no_grad_below: int = 0, explicit_from: int = 0) -> Any:
            return original(blocks, record, no_grad_below=no_grad_below, explicit_from=0)

        relevance.explicit_attention = every_block
    torch.manual_seed(seed)
    bundle = load_clip(model_name, "openai", load_weights=False)
    hold_frozen_in(bundle.model, BF16)
    size = int(bundle.image_size)
    options = {"num_tokens": 5} if method == "vpt" else {}
    adapter = create_adapter(method, bundle, CLASSES, options)
    task = AdapterTask(adapter, size, SaliencyConfig(start_layer=start_layer), "bf16")
    trainer = Trainer(task, _Sized(batch), optim=OptimConfig(lr=0.002, batch_size=batch, epochs=1),
                      run=RunConfig(device="cpu", precision="bf16", seed=seed), run_dir=tempfile.mkdtemp(),
                      num_classes=len(CLASSES), mixer=build_mixer("backmix"), backmix=BackMixConfig())
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, len(CLASSES), (batch,), generator=g)
    trainer.train_step(images[:2], labels[:2], torch.arange(2))  # lazy set-up outside the measurement
    with PeakRSS() as mem:
        t = _timed(lambda: trainer.train_step(images, labels, torch.arange(batch)))  # wall s, for orientation
    return {"model": model_name, "batch": batch, "method": method, "start_layer": start_layer, "legacy": legacy,
            "step_s": t, "rss_before_mib": mem.before / 2 ** 20, "peak_growth_mib": mem.growth_mib,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    rows = []
    for model_name, batch in args.memory_cases:
        for method, start, legacy in args.memory_variants:
            cfg = dict(model_name=model_name, batch=batch, method=method, start_layer=start, legacy=legacy, seed=args.seed)
            out = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(cfg)], env=env,
                                 stdout=subprocess.PIPE, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            log(f"[memory] {rows[-1]}")
    return {"rows": rows}


# ----------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    info = report["machine"]
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}, "
             f"{info['date']}; load average at start {', '.join(f'{x:.1f}' for x in info['loadavg_start'])}, "
             f"at end {', '.join(f'{x:.1f}' for x in info['loadavg_end'])}.", ""]
    if "eval" in report:
        ev = report["eval"]
        lines += [f"bf16 matmul 4096³ measured between rounds, GFLOP/s per CPU-second: "
                  f"{', '.join(f'{p[CLOCKS[0]]:.0f}' for p in ev['matmul_bf16_gflops'])}; per wall second: "
                  f"{', '.join(f'{p[CLOCKS[1]]:.0f}' for p in ev['matmul_bf16_gflops'])}. "
                  f"One ViT-B/16 image: {ev['flops_per_image'] / 1e9:.2f} GFLOPs.", "",
                  f"| encode_image, batch {ev['batch']}, inference mode | clock | median s | images/s | GFLOP/s "
                  "| % of matmul peak (medians) | % of peak per round |", "|---|---|---:|---:|---:|---:|---|"]
        for name, by_clock in ev["summary"].items():
            for clock, row in by_clock.items():
                lines.append(f"| {name} | {clock} | {row['median_s']:.2f} | {row['images_per_s']:.2f} | {row['gflops']:.0f} "
                             f"| {row['pct_of_peak']:.0f} % | {', '.join(f'{p:.0f}' for p in row['pct_of_peak_per_round'])} |")
        acc = ev["accuracy"]
        lines += ["", f"Fast path vs fp32 forward ({acc['n']} random images): cosine min {acc['cos_min']:.5f}, mean "
                  f"{acc['cos_mean']:.5f}; argmax agreement over 10 random class embeddings {100 * acc['argmax_agreement']:.1f} %.", ""]
    if "coop" in report:
        co = report["coop"]
        lines += [f"| CoOp step, bf16, B = {co['batch']} | clock | median s / step | images/s | per-round s |",
                  "|---|---|---:|---:|---|"]
        for name, by_clock in co["summary"].items():
            for clock, row in by_clock.items():
                lines.append(f"| {name} | {clock} | {row['median_s']:.2f} | {row['images_per_s']:.2f} "
                             f"| {', '.join(f'{t[clock]:.2f}' for t in co['times'][name])} |")
        lines.append("")
        for clock in CLOCKS:
            sp, bm = co["ratios"]["plain_speedup_over_official"][clock], co["ratios"]["backmix_over_plain2x"][clock]
            lines.append(f"{clock} time: plain speed-up over the official step **{sp['median']:.2f}x** (per round "
                         f"{', '.join(f'{x:.2f}' for x in sp['per_round'])}); BackMix step / plain step on the doubled "
                         f"batch **{bm['median']:.2f}x** (per round {', '.join(f'{x:.2f}' for x in bm['per_round'])}).")
        lines.append("")
    if "memory" in report:
        lines += ["| model, batch | method | start_layer | explicit attention in | step s | peak RSS growth (MiB) "
                  "| RSS before (MiB) |", "|---|---|---:|---|---:|---:|---:|"]
        for r in report["memory"]["rows"]:
            lines.append(f"| {r['model']}, {r['batch']} | {r['method']} | {r['start_layer']} "
                         f"| {'every block (before)' if r['legacy'] else 'window only (now)'} | {r['step_s']:.1f} "
                         f"| {r['peak_growth_mib']:.0f} | {r['rss_before_mib']:.0f} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["eval", "coop"], choices=["eval", "coop", "memory"])
    p.add_argument("--model", default="ViT-B-16", help="open_clip name for eval / coop (backmix-tiny-clip: a quick check)")
    p.add_argument("--batch", type=int, default=16, help="CoOp step batch (the issue's side-by-side used 16)")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory-cases", type=json.loads, default=MEMORY_CASES,
                   help='JSON list of [model, batch], default [["ViT-B-16", 64], ["ViT-L-14", 16]]')
    p.add_argument("--memory-variants", type=json.loads,
                   default=[["vpt", -1, False], ["vpt", -1, True], ["vpt", 0, False], ["coop", -1, False], ["coop", 0, False]],
                   help="JSON list of [method, start_layer, legacy]")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as is (the CLI's keep_freed_memory() is applied otherwise)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--views", default="auto", choices=["auto", "none"],
                   help="coop: the trainer's device views (auto: RandomResizedCrop + flip with the frame-consistent "
                        "bank, as the fewshot job; none: images as given, the measurement before issue 7)")
    p.add_argument("--compile", action="store_true", help="eval: also time the held tower under torch.compile")
    p.add_argument("--workers", type=int, default=0,
                   help="eval: also time the held tower with each batch split over this many single-threaded "
                        "worker threads (run.eval_workers; with --compile also the compiled tower so)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--part-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(**json.loads(args.memory_worker))))
        return
    if args.part_worker:
        if not args.default_malloc:
            from backmix_vlm.perf import keep_freed_memory

            keep_freed_memory()  # as the CLI does; both sides of every comparison share the process
        print(json.dumps({"eval": part_eval, "coop": part_coop, "memory": part_memory}[args.part_worker](args)))
        return
    info = machine_info()
    report: dict[str, Any] = {"machine": info, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    wall = time.perf_counter()
    for part in args.parts:
        cmd = [sys.executable, __file__, "--part-worker", part, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        report[part] = json.loads(out.strip().splitlines()[-1])
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - wall
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
