#!/usr/bin/env python
"""Training-time open-set / OOD methods, each Plain and + BackMix, on one table.

For every method (``method.name`` of the train job: plain, logitnorm, oe, rotpred, arpl) and seed,
trains ``backmix-vlm train <recipe>`` on CIFAR-10 6/4 (``--splits``, default 0), Plain and + BackMix
in one run folder (same seed, data order, schedule), evaluates the protocol's 4 unknown classes and
the OpenOOD-style CIFAR-10 sets we have (near = CIFAR-100, Tiny-ImageNet test; far = MNIST,
Textures = 10 DTD classes), each method with its intended score, and appends one JSON object per
trained model to ``--results`` (default ``docs/results/training_methods/runs.jsonl``): ``method``,
``backmix``, ``protocol``, ``split``, ``seed``, ``recipe``, ``score`` (the intended one), ``accuracy``,
``auroc`` (per unknown set, intended score, percent), ``seen_in_training`` (sets flagged "outlier
distribution seen in training": OE's outliers are Tiny-ImageNet *val* images, so every Tiny-ImageNet
result of an OE model is flagged and left out of its near / headline means), ``near`` / ``far``
(means over the unflagged sets), ``sets`` (every metric, intended score and MSP), ``train_seconds``,
machine, date, command.  Then the tables from runs.jsonl (``runs.md``): per method and variant,
mean ± std; paired + BackMix − Plain of the same method, split and seed; the published rows cited.

Protocols, JPEG round trip and metrics come from scripts/field_baseline.py (reused, not copied).

    python scripts/training_methods.py --seeds 0 1 2                       # every method, fast_v3 recipe
    python scripts/training_methods.py --methods plain oe --recipe field    # the field recipe (30 epochs)
    python scripts/training_methods.py --table                              # the tables from runs.jsonl only
    python scripts/training_methods.py --smoke ...                          # a tiny end-to-end pass (CPU)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _field_baseline():
    spec = importlib.util.spec_from_file_location("field_baseline", REPO / "scripts" / "field_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fb = _field_baseline()

RECIPES = {**fb.RECIPES, "resnet18": REPO / "configs" / "cnn" / "cifar10_osr_resnet18.yaml"}
PROTOCOL = "cifar10_6_4"
NEAR, FAR = ("CIFAR-100", "TIN"), ("MNIST", "Textures")
SETS = NEAR + FAR
OE_OUTLIERS = "{name: tinyimagenet, split: val, label: TIN-val, resize: resize, jpeg_quality: %d}" % fb.JPEG
METHODS: dict[str, list[str]] = {
    "plain": [],
    "logitnorm": ["method.name=logitnorm"],
    "oe": ["method.name=oe"],                    # + method.outliers (below: the smoke mode caps its size)
    "rotpred": ["method.name=rotpred"],
    "arpl": ["method.name=arpl"],
}
INTENDED = {"plain": "msp", "logitnorm": "msp", "oe": "msp", "rotpred": "rotpred", "arpl": "maxlogit"}
VARIANTS = ("plain", "backmix")

# Published rows (not ours; CIFAR-10, ResNet-18, 100 epochs on lossless images):
PUBLISHED = """Published rows, for orientation only (their ResNet-18 at 100 epochs on lossless CIFAR-10 and the full
OpenOOD sets — SVHN and Places365 in far-OOD, which we lack; our CIFAR-10 is a JPEG q75 copy, our
recipe is the one named in each row, our Textures is 10 DTD classes):

| source | method | near AUROC | far AUROC | 6/4 AUROC |
|---|---|---:|---:|---:|
| OpenOOD v1.5 CIFAR-10 leaderboard (Zhang et al. 2023) | MSP (plain CE) | 88.03 | 90.73 | |
| OpenOOD v1.5 | Outlier Exposure | 94.82 | 96.00 | |
| OpenOOD v1.5 | LogitNorm + PixMix | 94.25 | 97.90 | |
| OpenOOD v1.5 | RotPred + PixMix | 94.86 | 98.18 | |
| BackMix paper, Table IV / VIII | ARPL → ARPL + BackMix | | | 89.8 → 91.0 |
| BackMix paper, Table IV / VIII | CSSR → CSSR + BackMix (not implemented here) | | | 90.7 → 94.2 |
"""


def unknown_sets(root: str | None, sets: list[str]) -> list[str]:
    """``eval.ood`` entries of the OpenOOD-style sets asked for (field_baseline's sources and JPEG round trip)."""
    src = {"CIFAR-100": lambda: fb._src("cifar100", "CIFAR-100"),
           "TIN": lambda: fb._src("tinyimagenet", "TIN", resize="resize"),
           "MNIST": lambda: fb._src("mnist", "MNIST"),
           "Textures": lambda: fb.textures(root)}
    return [src[s]() for s in sets]


def method_overrides(method: str, root: str | None, smoke: bool) -> list[str]:
    out = list(METHODS[method])
    if method == "oe":
        outliers = OE_OUTLIERS if not smoke else OE_OUTLIERS[:-1] + ", max_samples: 600}"
        out.append(f"method.outliers={outliers}")
    return out


def records(run_dir: Path, recipe: str, method: str, split: int, seed: int, smoke: bool) -> list[dict]:
    """One record per trained model (variant) of a finished run folder, from its per-sample scores."""
    from backmix_vlm.ood import load_scores

    out = []
    res = json.loads((run_dir / "results.json").read_text())["variants"]
    for variant, r in res.items():
        scores, meta = load_scores(run_dir / variant / "scores.safetensors")
        score = r.get("intended_score") or INTENDED[method]
        sets = {s: {sc: fb.set_metrics(scores, s, sc) for sc in dict.fromkeys((score, "msp")) if sc in meta["scores"]}
                for s in meta["unknown_sets"]}
        seen = sorted(r.get("seen_in_training", {}))
        auroc = {s: v[score]["auroc"] for s, v in sets.items()}
        headline = lambda names: (float(np.mean([auroc[s] for s in names if s in auroc and s not in seen]))  # noqa: E731
                                  if any(s in auroc and s not in seen for s in names) else None)
        protocol_set = next((s for s in auroc if s.startswith("cifar10 unknown")), None)
        rec = {"method": method, "backmix": variant == "backmix", "protocol": PROTOCOL, "split": split, "seed": seed,
               "recipe": recipe, "score": score, "accuracy": 100 * r["acc"], "auroc": auroc,
               "auroc_protocol": auroc.get(protocol_set) if protocol_set else None,
               "near": headline(NEAR), "far": headline(FAR), "seen_in_training": seen,
               "train_seconds": r.get("train_time_s"), "epochs": r.get("epochs"), "sets": sets,
               "machine": fb.machine(), "date": date.today().isoformat(), "run": run_dir.name}
        if smoke:
            rec["smoke"] = True
        out.append(rec)
    return out


def append(results: Path, recs: list[dict]) -> None:
    """Add ``recs`` to the JSONL file, replacing records of the same model (recipe, method, split, seed, backmix)."""
    fb.append(results, recs, ("recipe", "method", "split", "seed", "backmix"))


# ----------------------------------------------------------------------------- tables
def table(rows: list[dict]) -> str:
    """Per (recipe, method, variant): mean ± std over splits x seeds; paired + BackMix − Plain of the same method."""
    rows = [r for r in rows if not r.get("smoke")]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["method"], "backmix" if r["backmix"] else "plain"), []).append(r)
    cols = ["auroc_protocol", "near", "far"] + [f"set:{s}" for s in SETS]

    def value(r: dict, c: str) -> float | None:
        return r["auroc"].get(c[4:]) if c.startswith("set:") else r.get(c)

    def cell(rs: list[dict], c: str) -> str:
        vals = [value(r, c) for r in rs if value(r, c) is not None]
        flagged = c.startswith("set:") and any(c[4:] in r["seen_in_training"] for r in rs)
        return fb._ms(vals) + (" †" if flagged and vals else "")

    lines = ["| recipe | method | variant | score | models (splits / seeds) | Acc | AUROC 6/4 | near | far | "
             + " | ".join(SETS) + " | train s |",
             "|---|---|---|---|---|---:|---:|---:|---:|" + "---:|" * len(SETS) + "---:|"]
    for (recipe, method, variant), rs in sorted(groups.items()):
        lines.append(f"| {recipe} | {method} | {variant} | {rs[0]['score']} | {fb.models_where(rs)} | "
                     f"{fb._ms([r['accuracy'] for r in rs])} | " + " | ".join(cell(rs, c) for c in cols) + " | "
                     f"{fb._ms([r['train_seconds'] for r in rs if r['train_seconds'] is not None])} |")
    diff = ["| recipe | method | pairs | Δ Acc | Δ AUROC 6/4 | Δ near | Δ far |", "|---|---|---:|---:|---:|---:|---:|"]
    for (recipe, method), pairs in fb.backmix_pairs(groups).items():
        diff.append(f"| {recipe} | {method} | {len(pairs)} | " + " | ".join(
            fb._ms([b[k] - p[k] for b, p in pairs if b.get(k) is not None and p.get(k) is not None])
            for k in ("accuracy", "auroc_protocol", "near", "far")) + " |")
    return ("\n".join(lines) + "\n\n† outlier distribution seen in training (OE's outliers are Tiny-ImageNet val "
            "images): shown, but left out of near / far.\n\nPaired + BackMix − Plain of the same method (same "
            "split, seed, data order, schedule), points:\n\n" + "\n".join(diff) + "\n\n" + PUBLISHED)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="the data root (default: $BACKMIX_DATA, else ./data)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "training_methods")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "training_methods" / "runs.jsonl")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fast_v3")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--splits", type=int, nargs="+", default=[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS, help="OpenOOD-style unknown sets to add")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="1 epoch on 600 images per class: a pipeline check")
    p.add_argument("--table", action="store_true", help="only print / write the tables from --results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra section.key=value override (repeatable)")
    a = p.parse_args(argv)
    if not a.table:
        if a.recipe not in fb.RECIPES:
            fb.RECIPES[a.recipe] = RECIPES[a.recipe]
        extra = [f"run.device={a.device}", "plots=false", "eval.every=0"] + \
            ([f"data_root={a.data_root}"] if a.data_root else [])
        if a.epochs is not None or a.smoke:
            extra.append(f"optim.epochs={1 if a.smoke else a.epochs}")
        if a.smoke:
            fb.SMOKE_SAMPLES = 200
            extra += ["data.train.max_samples=600", "data.test.max_samples=600", "optim.batch_size=128"]
        a.out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/training_methods.py " + " ".join(map(shlex.quote, argv if argv is not None
                                                                                    else sys.argv[1:]))
        for method in a.methods:
            for split in a.splits:
                for seed in a.seeds:
                    start = time.perf_counter()
                    # the protocol's 4 unknown classes come with data.protocol; eval.ood = the OpenOOD-style sets
                    over = (extra + ["eval.ood=[" + ", ".join(unknown_sets(a.data_root, a.sets)) + "]"]
                            + method_overrides(method, a.data_root, a.smoke) + a.overrides)
                    run_dir = fb.train(a.out, a.recipe, "cifar10_6_4", split, seed, a.variants, over, a.data_root,
                                       label=f"{a.recipe}-{method}")
                    recs = records(run_dir, a.recipe, method, split, seed, a.smoke)
                    for r in recs:
                        r["overrides"], r["command"] = a.overrides, command
                    append(a.results, recs)
                    print(f"{run_dir.name}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = [json.loads(line) for line in a.results.read_text().splitlines() if line.strip()] if a.results.is_file() else []
    md = table(rows)
    if rows:
        a.results.with_suffix(".md").write_text(f"# Training methods, Plain vs + BackMix, from {a.results.name}\n\n"
                                                "Percent; mean ± std over models; each method with its intended "
                                                "score.\n\n" + md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
