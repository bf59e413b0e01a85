#!/usr/bin/env python
"""Open-set baselines at the field's level: Plain vs + BackMix on the paper's CIFAR protocols.

Trains ``backmix-vlm train <recipe>`` for every (protocol, split, seed) asked for, Plain and
+ BackMix in one run folder (same seed, data order and schedule), and appends one JSON object per
trained model to ``--results`` (default ``docs/results/field_baseline/runs.jsonl``):
``protocol``, ``split``, ``seed``, ``variant``, ``recipe``, ``accuracy``, ``auroc_msp``,
``auroc_maxlogit`` (percent, on the protocol's unknown set), ``train_seconds``, and ``sets``:
per unknown set and score AUROC, AUPR-In / -Out, DTACC and FPR95 in both conventions
(``fpr95_id_positive``: unknowns accepted at 95 % TPR on knowns, OSR / OE / MCM; ``fpr95_ood_positive``:
knowns rejected at 95 % recall of unknowns, OpenOOD / pytorch-ood), all from the run's per-sample
scores (``scores.safetensors``; nothing is scored twice).

Protocols (CIFAR-10 here is the JPEG q75 copy; every other set gets the same JPEG round trip):
``cifar10_6_4`` (Table IV: 6 known / 4 unknown CIFAR-10 classes, splits 0-4, + CIFAR-100 and
Tiny-ImageNet as extra unknowns); ``cifar_plus_10`` / ``cifar_plus_50`` (4 non-animal CIFAR-10
classes known, 10 / 50 CIFAR-100 classes unknown, ARPL's lists); ``cifar10_vs_cifar100``
(10-class CIFAR-10, Table VI: CIFAR-100 unknown, DTACC / AUROC / AUIN / AUOUT; the same model also
gives the OpenOOD v1.5 CIFAR-10 layout with the sets we have: near = CIFAR-100, Tiny-ImageNet,
far = MNIST, Textures (10 DTD classes); no SVHN / Places365 here).

    python scripts/field_baseline.py --protocol cifar10_6_4 --splits 0 1 2 3 4 --seeds 0
    python scripts/field_baseline.py --protocol cifar10_vs_cifar100 --seeds 0
    python scripts/field_baseline.py --table                  # the tables from runs.jsonl only
    python scripts/field_baseline.py --smoke ...              # a tiny end-to-end pass (CPU, minutes)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {"field": REPO / "configs" / "cnn" / "cifar10_field.yaml",            # the field-level recipe
           "fast_v3": REPO / "configs" / "cnn" / "cifar10_osr_airbench_v3.yaml"}  # the 10-epoch recipe v3
VARIANTS = {"plain": ["backmix.enabled=false"], "backmix": []}
JPEG = 75                   # the CIFAR-10 copy here is JPEG q~75: every other set gets the same round trip
PROTOCOLS = ("cifar10_6_4", "cifar_plus_10", "cifar_plus_50", "cifar10_vs_cifar100")
NEAR, FAR = ("CIFAR-100", "TIN"), ("MNIST", "Textures")
SCORES = ("msp", "maxlogit")
SMOKE_SAMPLES: int | None = None   # --smoke: images per unknown set


def _src(name: str, label: str, **kw) -> str:
    if SMOKE_SAMPLES:
        kw["max_samples"] = SMOKE_SAMPLES
    items = ", ".join([f"name: {name}", "split: test", f"label: {label}", f"jpeg_quality: {JPEG}"]
                      + [f"{k}: {v}" for k, v in kw.items()])
    return "{" + items + "}"


def textures(root: str | None) -> str:
    """Our partial DTD (10 classes, ``<data_root>/dtd_partial/images/<class>/``) as an image folder."""
    from backmix_vlm.config import default_data_root

    base = Path(root or default_data_root()) / "dtd_partial"
    return _src("imagefolder", "Textures", root=str(base), resize="center_crop").replace("split: test", "split: images")


def protocol_overrides(protocol: str, split: int, root: str | None) -> tuple[list[str], str]:
    """(config overrides, display name of the protocol's unknown set)."""
    from backmix_vlm.data.protocols import get_protocol

    if protocol == "cifar10_6_4":
        ood = [_src("cifar100", "CIFAR-100"), _src("tinyimagenet", "TIN", resize="resize")]
        return [f"data.protocol=cifar10", f"data.protocol_split={split}", "eval.ood=[" + ", ".join(ood) + "]"], \
            f"cifar10 unknown (split {split})"
    if protocol in ("cifar_plus_10", "cifar_plus_50"):
        p = get_protocol(protocol.replace("_plus_", "+").replace("cifar+", "cifar_plus_"), split)
        label = f"{protocol} unknown (split {split})"
        unknown = _src("cifar100", f"'{label}'", classes=list(p.unknown))
        known = list(p.known)
        return ["data.protocol=null", f"data.train.classes={known}", f"data.test.classes={known}",
                "eval.ood=[" + unknown + "]"], label
    if protocol == "cifar10_vs_cifar100":
        ood = [_src("cifar100", "CIFAR-100"), _src("tinyimagenet", "TIN", resize="resize"),
               _src("mnist", "MNIST"), textures(root)]
        return ["data.protocol=null", "eval.ood=[" + ", ".join(ood) + "]"], "CIFAR-100"
    raise SystemExit(f"unknown protocol {protocol!r}; choose {', '.join(PROTOCOLS)}")


def train(out: Path, recipe: str, protocol: str, split: int, seed: int, variants: list[str],
          extra: list[str], root: str | None, label: str | None = None) -> Path:
    """The run folder of (recipe, protocol, split, seed) with every asked-for variant finished."""
    from backmix_vlm.cli import main as cli

    name = f"{label or recipe}-{protocol}-split{split}-seed{seed}"
    run_dir = out / name
    if (run_dir / "results.json").is_file():
        have = set(json.loads((run_dir / "results.json").read_text())["variants"])
        if set(variants) <= have:
            return run_dir
        raise SystemExit(f"{run_dir} finished without {sorted(set(variants) - have)}: use another --out")
    proto, _ = protocol_overrides(protocol, split, root)
    args = ["train", str(RECIPES[recipe]), f"run.output_dir={out}", f"run.name={name}", f"run.seed={seed}",
            "variants=" + json.dumps({v: VARIANTS[v] for v in variants}), *proto, *extra]
    if run_dir.is_dir():
        args.append("--resume")
    print("$ backmix-vlm " + " ".join(args), flush=True)
    if cli(args) != 0:
        raise SystemExit(f"run {name} failed")
    return run_dir


SET_METRICS = ("auroc", "aupr_in", "aupr_out", "dtacc", "fpr95_id_positive", "fpr95_ood_positive")


def set_metrics(scores: dict[str, np.ndarray], unknown: str, score: str,
                stored: dict | None = None) -> dict[str, float]:
    """Every metric of one (unknown set, score), both FPR95 conventions, in percent: the run's
    results.json entry ``stored`` when it has them all, else from the per-sample scores."""
    from backmix_vlm.ood.metrics import ood_metrics

    m = stored or {}
    if not all(key in m for key in SET_METRICS):  # runs from before both conventions were stored
        m = ood_metrics(scores[f"known::{score}"], scores[f"unknown::{unknown}::{score}"])
    return {key: 100 * m[key] for key in SET_METRICS}


def records(run_dir: Path, recipe: str, protocol: str, split: int, seed: int, unknown: str,
            smoke: bool) -> list[dict]:
    """One record per trained model (variant) of a finished run folder."""
    from backmix_vlm.ood import load_scores

    out = []
    res = json.loads((run_dir / "results.json").read_text())["variants"]
    for variant, r in res.items():
        scores, meta = load_scores(run_dir / variant / "scores.safetensors")
        own = run_dir / variant / "results.json"
        stored = json.loads(own.read_text())["results"] if own.is_file() else {}
        sets = {s: {sc: set_metrics(scores, s, sc, stored.get(s, {}).get(sc)) for sc in SCORES if sc in meta["scores"]}
                for s in meta["unknown_sets"]}
        rec = {"protocol": protocol, "split": split, "seed": seed, "variant": variant, "recipe": recipe,
               "accuracy": 100 * r["acc"], "auroc_msp": sets[unknown]["msp"]["auroc"],
               "auroc_maxlogit": sets[unknown]["maxlogit"]["auroc"],
               "train_seconds": r.get("train_time_s"), "epochs": r.get("epochs"), "sets": sets,
               "machine": machine(), "date": date.today().isoformat(), "run": run_dir.name}
        if protocol == "cifar10_vs_cifar100":
            rec["openood"] = {group: {sc: {m: float(np.mean([sets[s][sc][m] for s in names]))
                                           for m in ("auroc", "fpr95_ood_positive", "fpr95_id_positive")}
                                      for sc in SCORES}
                              for group, names in (("near", NEAR), ("far", FAR))}
        if smoke:
            rec["smoke"] = True
        out.append(rec)
    return out


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu} ({os.cpu_count()} cores)"


MODEL_KEY = ("recipe", "protocol", "split", "seed", "variant")


def append(results: Path, recs: list[dict], model_key: tuple[str, ...] = MODEL_KEY) -> None:
    """Add ``recs`` to the JSONL file, replacing records of the same model (the ``model_key`` fields)."""
    key = lambda r: (*(r[f] for f in model_key), r.get("smoke", False))  # noqa: E731
    old = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    new_keys = {key(r) for r in recs}
    rows = [r for r in old if key(r) not in new_keys] + recs
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(results)


# ----------------------------------------------------------------------------- tables
def _ms(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return "–"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def models_where(rs: list[dict]) -> str:
    """``n ([splits] / [seeds])``: how many models a table row averages, and which."""
    return f"{len(rs)} ({sorted({r['split'] for r in rs})} / {sorted({r['seed'] for r in rs})})"


def backmix_pairs(groups: dict[tuple, list[dict]]) -> dict[tuple, list[tuple[dict, dict]]]:
    """``(recipe, what, variant) -> models`` -> ``(recipe, what) -> [(+ BackMix, Plain)]`` of the same
    split and seed (same data order and schedule); groups without a Plain partner are left out."""
    out = {}
    for (recipe, what, variant), rs in sorted(groups.items()):
        if variant != "backmix":
            continue
        plain = {(r["split"], r["seed"]): r for r in groups.get((recipe, what, "plain"), [])}
        pairs = [(b, plain[(b["split"], b["seed"])]) for b in rs if (b["split"], b["seed"]) in plain]
        if pairs:
            out[(recipe, what)] = pairs
    return out


def per_model(rows: list[dict]) -> str:
    """One line per trained model of the open-set protocols (what every mean above is made of)."""
    rows = sorted((r for r in rows if r["protocol"] != "cifar10_vs_cifar100"),
                  key=lambda r: (r["recipe"], r["protocol"], r["split"], r["seed"], r["variant"]))
    if not rows:
        return ""
    extra = sorted({k for r in rows for k in r.get("sets", {}) if not k.startswith(("cifar10 unknown", "unknown"))})
    md = ("\nPer model (MaxLogit AUROC on the extra unknown sets too):\n\n"
          "| recipe | protocol | split | seed | variant | Acc | AUROC MSP | AUROC MaxLogit | "
          + "".join(f"{k} MaxLogit | " for k in extra) + "train s | date |\n"
          "|---|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(extra) + "---:|---|\n")
    for r in rows:
        sets = r.get("sets", {})
        md += (f"| {r['recipe']} | {r['protocol']} | {r['split']} | {r['seed']} | {r['variant']} | "
               f"{r['accuracy']:.1f} | {r['auroc_msp']:.1f} | {r['auroc_maxlogit']:.1f} | "
               + "".join(f"{sets[k]['maxlogit']['auroc']:.1f} | " if k in sets else "– | " for k in extra)
               + (f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "–")
               + f" | {r.get('date', '–')} |\n")
    return md


def table(rows: list[dict]) -> str:
    """Per (recipe, protocol, variant): mean ± std over splits x seeds; paired + BackMix − Plain."""
    rows = [r for r in rows if not r.get("smoke")]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["protocol"], r["variant"]), []).append(r)
    lines = ["| recipe | protocol | variant | models (splits / seeds) | Acc | AUROC MSP | AUROC MaxLogit | train s |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for (recipe, protocol, variant), rs in sorted(groups.items()):
        lines.append(f"| {recipe} | {protocol} | {variant} | {models_where(rs)} | {_ms([r['accuracy'] for r in rs])} | "
                     f"{_ms([r['auroc_msp'] for r in rs])} | {_ms([r['auroc_maxlogit'] for r in rs])} | "
                     f"{_ms([r['train_seconds'] for r in rs if r['train_seconds'] is not None])} |")
    diff = ["| recipe | protocol | pairs | Δ Acc | Δ AUROC MSP | Δ AUROC MaxLogit |", "|---|---|---:|---:|---:|---:|"]
    for (recipe, protocol), pairs in backmix_pairs(groups).items():
        diff.append(f"| {recipe} | {protocol} | {len(pairs)} | "
                    + " | ".join(_ms([b[k] - p[k] for b, p in pairs])
                                 for k in ("accuracy", "auroc_msp", "auroc_maxlogit")) + " |")
    md = "\n".join(lines) + "\n\nPaired + BackMix − Plain (same split, seed, data order, schedule), points:\n\n" \
        + "\n".join(diff) + "\n"
    md += per_model(rows)
    t6 = [r for r in rows if r["protocol"] == "cifar10_vs_cifar100"]
    if t6:
        md += ("\n10-class CIFAR-10 vs CIFAR-100 (Table VI's metrics, MaxLogit) and the OpenOOD v1.5 layout "
               "(near = CIFAR-100, TIN; far = MNIST, Textures; AUROC and FPR95 with OOD as positive as OpenOOD "
               "reports it, and with ID as positive):\n\n"
               "| recipe | variant | n | Acc | DTACC | AUROC | AUIN | AUOUT | near AUROC | far AUROC | "
               "near FPR95 (OOD+) | far FPR95 (OOD+) | near FPR95 (ID+) | far FPR95 (ID+) |\n"
               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        by: dict[tuple, list[dict]] = {}
        for r in t6:
            by.setdefault((r["recipe"], r["variant"]), []).append(r)
        for (recipe, variant), rs in sorted(by.items()):
            c = [r["sets"]["CIFAR-100"]["maxlogit"] for r in rs]
            o = [r["openood"] for r in rs]
            md += (f"| {recipe} | {variant} | {len(rs)} | {_ms([r['accuracy'] for r in rs])} | "
                   + " | ".join(_ms([x[m] for x in c]) for m in ("dtacc", "auroc", "aupr_in", "aupr_out")) + " | "
                   + " | ".join(_ms([x[g]["maxlogit"][m] for x in o]) for m, g in
                                (("auroc", "near"), ("auroc", "far"), ("fpr95_ood_positive", "near"),
                                 ("fpr95_ood_positive", "far"), ("fpr95_id_positive", "near"),
                                 ("fpr95_id_positive", "far"))) + " |\n")
    return md


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="the data root (default: $BACKMIX_DATA, else ./data)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "field_baseline")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "field_baseline" / "runs.jsonl")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="field")
    p.add_argument("--name", default=None, help="the recipe's name in records and run folders when --set "
                   "changes it (a lever: e.g. v3_ls0); default: --recipe")
    p.add_argument("--protocol", choices=PROTOCOLS, default="cifar10_6_4")
    p.add_argument("--splits", type=int, nargs="+", default=[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["plain", "backmix"], choices=sorted(VARIANTS))
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="1 epoch on 600 images per class: a pipeline check")
    p.add_argument("--table", action="store_true", help="only print / write the tables from --results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra section.key=value override (repeatable)")
    a = p.parse_args()
    if not a.table:
        extra = [f"run.device={a.device}", "plots=false"] + ([f"data_root={a.data_root}"] if a.data_root else [])
        if a.epochs is not None or a.smoke:
            extra.append(f"optim.epochs={1 if a.smoke else a.epochs}")
        if a.smoke:
            global SMOKE_SAMPLES
            SMOKE_SAMPLES = 200
            extra += ["data.train.max_samples=600", "data.test.max_samples=600", "optim.batch_size=128"]
        extra += a.overrides
        a.out.mkdir(parents=True, exist_ok=True)
        for split in a.splits:
            for seed in a.seeds:
                start = time.perf_counter()
                run_dir = train(a.out, a.recipe, a.protocol, split, seed, a.variants, extra, a.data_root, a.name)
                _, unknown = protocol_overrides(a.protocol, split, a.data_root)
                recs = records(run_dir, a.name or a.recipe, a.protocol, split, seed, unknown, a.smoke)
                for r in recs:
                    r["overrides"] = a.overrides
                append(a.results, recs)
                print(f"{run_dir.name}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = [json.loads(line) for line in a.results.read_text().splitlines() if line.strip()] if a.results.is_file() else []
    md = table(rows)
    if rows:  # runs.jsonl -> runs.md
        a.results.with_suffix(".md").write_text(f"# Plain vs + BackMix, from {a.results.name}\n\n"
                                                "Percent; mean ± std over models.\n\n" + md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
