"""``bgshift``: a background-shift open-set benchmark whose true foregrounds are known.

Why: BackMix claims to remove a fore-/background prior, and its mask bank claims to find
the foreground.  Natural datasets measure neither.  Here real objects with exact masks are
composited onto real backgrounds with a *planted* class <-> background correlation (the
analogue of the supplement's Waterbirds study, Table VI, with exact masks; Waterbirds and
Places are not available on the machines this is built on).

Composition (every draw from one seeded ``numpy`` generator, so a dataset is a function of
its arguments):

* **Objects**: Fashion-MNIST items (known classes, default T-shirt, trouser, dress, sandal,
  sneaker, bag) and MNIST digits (the unknown classes), tinted with a random saturated
  colour, scaled to ``object_size`` px and placed uniformly inside the image.  Their
  grey levels are the alpha matte; the **true mask** is ``alpha >= 0.25``.
* **Backgrounds**: random crops of DTD texture images (families = texture classes) and of
  Tiny-ImageNet test images, resized to ``size`` px.  The first ``len(known)`` texture
  families are the known classes' *own* backgrounds; the others (and Tiny-ImageNet) are
  never seen in training.  Each family's images are split into train and test pools.
* **Training split**: class ``c`` lies on its own family with probability ``rho`` and on one
  of the other known families (uniformly) otherwise.
* **Test splits**: ``test_matched`` (known classes on their own family), ``test_swapped`` (the
  same items on another known family: the background-reliance gap is the accuracy drop),
  ``unknown_known_bg`` (digits on the known families) and ``unknown_unseen_bg`` (digits on
  unseen textures and Tiny-ImageNet crops).

Layout written (read back by ``name: bgshift`` with ``root`` = this folder)::

    <out>/meta.json                        arguments, class names, families, counts
    <out>/<split>.npz                      images (N, H, W, 3) uint8, labels (N,), masks (N, H, W) bool,
                                           background (N,) family id (-1: Tiny-ImageNet)

Generate with ``python -m backmix_vlm.data.bgshift --help``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError

SPLITS = ("train", "test_matched", "test_swapped", "unknown_known_bg", "unknown_unseen_bg")
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MASK_THRESHOLD = 0.25
FORMAT = 1


@dataclass
class BgShiftSpec:
    rho: float = 0.9                                   # P(background family == the class's own) in training
    seed: int = 0
    size: int = 32                                     # image side (px)
    known: list[int] = field(default_factory=lambda: [0, 1, 3, 5, 7, 8])  # Fashion-MNIST classes
    train_per_class: int = 700                         # Fashion-MNIST test items per known class used for training
    test_per_class: int = 300                          # ... and for the known test splits (disjoint items)
    unknown_per_set: int = 1800                        # MNIST digits per unknown split
    object_size: tuple[int, int] = (16, 26)            # object side range (px)
    bg_crop: tuple[float, float] = (0.3, 1.0)          # background crop side, fraction of the source's shorter side

    def validate(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise DataError(f"bgshift: rho={self.rho}; expected a number in [0, 1]")
        if len(set(self.known)) != len(self.known) or not all(0 <= c < 10 for c in self.known) or len(self.known) < 2:
            raise DataError(f"bgshift: known={self.known}; expected >= 2 distinct Fashion-MNIST class ids 0..9")
        if not 8 <= self.size <= 256 or not 4 <= self.object_size[0] <= self.object_size[1] <= self.size:
            raise DataError(f"bgshift: size={self.size}, object_size={self.object_size}; need 4 <= min <= max <= size")


# ----------------------------------------------------------------------------- sources
def _idx_pair(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    from .layouts import _idx_file, read_idx

    for base in (folder, folder / "raw"):
        img, lab = _idx_file(base, "t10k-images-idx3-ubyte"), _idx_file(base, "t10k-labels-idx1-ubyte")
        if img and lab:
            return read_idx(img).astype(np.uint8), read_idx(lab).astype(np.int64)
    raise DataError(f"bgshift: {name} test files t10k-{{images-idx3,labels-idx1}}-ubyte[.gz] not found in {folder}")


def _texture_families(dtd: Path) -> list[tuple[str, list[Path]]]:
    base = dtd / "images" if (dtd / "images").is_dir() else dtd
    fams = [(d.name, sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
            for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []
    fams = [(n, ps) for n, ps in fams if ps]
    if not fams:
        raise DataError(f"bgshift: no texture class folders (<dtd>/images/<class>/*.jpg) under {dtd}")
    return fams


def _tiny_images(tiny: Path) -> list[Path]:
    for d in (tiny / "test" / "images", tiny / "tiny-imagenet-200" / "test" / "images", tiny):
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
            if files:
                return files
    raise DataError(f"bgshift: no Tiny-ImageNet test images (test/images/*.JPEG) under {tiny}")


class _Backgrounds:
    """Random crops of source images, resized to ``size`` (images decoded once, lazily)."""

    def __init__(self, size: int, crop: tuple[float, float]) -> None:
        self.size, self.crop, self._cache = size, crop, {}

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        if path not in self._cache:
            with Image.open(path) as im:
                self._cache[path] = np.asarray(im.convert("RGB"))
        return self._cache[path]

    def draw(self, rng: np.random.Generator, paths: Sequence[Path]) -> np.ndarray:
        from PIL import Image

        img = self._load(paths[int(rng.integers(len(paths)))])
        h, w = img.shape[:2]
        side = max(8, int(min(h, w) * rng.uniform(*self.crop)))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        patch = Image.fromarray(img[top:top + side, left:left + side])
        if rng.random() < 0.5:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(patch.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32)


def _composite(rng: np.random.Generator, item: np.ndarray, background: np.ndarray,
               spec: BgShiftSpec) -> tuple[np.ndarray, np.ndarray]:
    """Tinted, scaled item pasted at a random place: (image uint8 (H, W, 3), mask bool (H, W))."""
    import colorsys

    from PIL import Image

    side = int(rng.integers(spec.object_size[0], spec.object_size[1] + 1))
    alpha_small = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR),
                             dtype=np.float32) / 255.0
    top, left = (int(rng.integers(spec.size - side + 1)) for _ in range(2))
    alpha = np.zeros((spec.size, spec.size), np.float32)
    alpha[top:top + side, left:left + side] = alpha_small
    colour = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)),
                      np.float32) * 255.0
    out = background * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha >= MASK_THRESHOLD


# ----------------------------------------------------------------------------- generation
def generate(out: str | Path, *, fashion_mnist: str | Path, mnist: str | Path, dtd: str | Path,
             tinyimagenet: str | Path, spec: BgShiftSpec | None = None, overwrite: bool = False) -> Path:
    """Write one bgshift dataset to ``out`` (see the module docstring); returns ``out``."""
    spec = spec or BgShiftSpec()
    spec.validate()
    out = Path(out)
    if (out / "meta.json").exists() and not overwrite:
        raise DataError(f"bgshift: {out} already holds a dataset (meta.json); choose another folder or pass overwrite")
    rng = np.random.default_rng(spec.seed)
    f_img, f_lab = _idx_pair(Path(fashion_mnist), "Fashion-MNIST")
    m_img, m_lab = _idx_pair(Path(mnist), "MNIST")
    families = _texture_families(Path(dtd))
    k = len(spec.known)
    if len(families) < k + 1:
        raise DataError(f"bgshift: {len(families)} texture families under {dtd}; need {k} for the known classes "
                        "and at least one unseen")
    tiny = _tiny_images(Path(tinyimagenet))
    # each family's images: two thirds for training backgrounds, the rest for test backgrounds
    pools = []
    for _, paths in families:
        order = rng.permutation(len(paths))
        cut = max(1, (2 * len(paths)) // 3)
        pools.append(([paths[i] for i in order[:cut]], [paths[i] for i in order[cut:]] or [paths[order[0]]]))
    bgs = _Backgrounds(spec.size, spec.bg_crop)
    known_fams, unseen_fams = list(range(k)), list(range(k, len(families)))

    # disjoint Fashion-MNIST items per known class for train / test
    train_items, test_items = [], []
    for c in spec.known:
        idx = rng.permutation(np.flatnonzero(f_lab == c))
        need = spec.train_per_class + spec.test_per_class
        if len(idx) < need:
            raise DataError(f"bgshift: Fashion-MNIST class {c} has {len(idx)} test items; need {need}")
        train_items.append(idx[:spec.train_per_class])
        test_items.append(idx[spec.train_per_class:need])
    digits = rng.permutation(len(m_lab))[: 2 * spec.unknown_per_set]

    def build(items: list[tuple[np.ndarray, int, int, bool]]) -> dict[str, np.ndarray]:
        """items: (grey item, label, family id or -1 for Tiny-ImageNet, test pool?)."""
        images, masks, labels, fams = [], [], [], []
        for item, label, fam, test in items:
            paths = tiny if fam < 0 else pools[fam][1 if test else 0]
            image, mask = _composite(rng, item, bgs.draw(rng, paths), spec)
            images.append(image), masks.append(mask), labels.append(label), fams.append(fam)
        return {"images": np.stack(images), "masks": np.stack(masks), "labels": np.asarray(labels, np.int64),
                "background": np.asarray(fams, np.int64)}

    def other(fam: int) -> int:
        return int(rng.choice([f for f in known_fams if f != fam]))

    splits: dict[str, list] = {s: [] for s in SPLITS}
    for y, idx in enumerate(train_items):
        for i in idx:
            fam = y if rng.random() < spec.rho else other(y)
            splits["train"].append((f_img[i], y, fam, False))
    for y, idx in enumerate(test_items):
        for i in idx:
            splits["test_matched"].append((f_img[i], y, y, True))
            splits["test_swapped"].append((f_img[i], y, other(y), True))
    for j, i in enumerate(digits):
        if j < spec.unknown_per_set:
            splits["unknown_known_bg"].append((m_img[i], int(m_lab[i]), int(rng.choice(known_fams)), True))
        else:
            fam = -1 if rng.random() < 0.5 else int(rng.choice(unseen_fams))
            splits["unknown_unseen_bg"].append((m_img[i], int(m_lab[i]), fam, True))

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, items in splits.items():
        arrays = build(items)
        np.savez_compressed(out / f"{name}.npz", **arrays)
        counts[name] = len(items)
    meta = {"format": FORMAT, "spec": asdict(spec), "counts": counts,
            "classes": [FASHION_NAMES[c] for c in spec.known],
            "unknown_classes": [str(d) for d in range(10)],
            "families": [n for n, _ in families], "known_families": [families[f][0] for f in known_fams],
            "unseen_families": [families[f][0] for f in unseen_fams] + ["tinyimagenet"],
            "sources": {"fashion_mnist": str(fashion_mnist), "mnist": str(mnist), "dtd": str(dtd),
                        "tinyimagenet": str(tinyimagenet)}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------- reading
def read_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images, labels, masks, class names) of one split; names are the unknown digits for the
    ``unknown_*`` splits."""
    folder = Path(folder)
    meta_path, data_path = folder / "meta.json", folder / f"{split}.npz"
    if not meta_path.is_file() or not data_path.is_file():
        raise DataError(f"bgshift: {data_path} / meta.json not found; generate the dataset with "
                        "python -m backmix_vlm.data.bgshift --out <folder> ...")
    meta = json.loads(meta_path.read_text())
    with np.load(data_path) as z:
        images, labels, masks = z["images"], z["labels"], z["masks"]
    names = meta["unknown_classes"] if split.startswith("unknown") else meta["classes"]
    return images, labels, masks, list(names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backmix_vlm.data.bgshift", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (must not hold a dataset yet)")
    p.add_argument("--fashion-mnist", required=True, help="folder with t10k-*-ubyte[.gz] of Fashion-MNIST")
    p.add_argument("--mnist", required=True, help="folder with t10k-*-ubyte[.gz] of MNIST")
    p.add_argument("--dtd", required=True, help="DTD folder (<dtd>/images/<class>/*.jpg)")
    p.add_argument("--tinyimagenet", required=True, help="Tiny-ImageNet folder (test/images/*.JPEG)")
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-per-class", type=int, default=700)
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--unknown-per-set", type=int, default=1800)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    spec = BgShiftSpec(rho=a.rho, seed=a.seed, size=a.size, train_per_class=a.train_per_class,
                       test_per_class=a.test_per_class, unknown_per_set=a.unknown_per_set)
    out = generate(a.out, fashion_mnist=a.fashion_mnist, mnist=a.mnist, dtd=a.dtd, tinyimagenet=a.tinyimagenet,
                   spec=spec, overwrite=a.overwrite)
    print(f"wrote {out}: {json.loads((out / 'meta.json').read_text())['counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
