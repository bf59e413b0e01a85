#!/usr/bin/env python
"""Reproduce the paper's Table V: CoOp / LoCoOp (1/4/16-shot, full data) and VPT (full data),
each with and without BackMix — plus LoRA rows (CLIP-LoRA's recipe) beside CoOp / LoCoOp —
CLIP ViT-B/16 (OpenAI weights), CIFAR-10 known vs CIFAR-100 and SVHN unknown; writes one
combined table.

Needs a GPU and the CLIP weights (open_clip downloads them once) — on a CPU this sweep
takes days.  Every row is one config in configs/fewshot/table_v/; finished rows are reused
(``--resume``), so the sweep can be interrupted and continued.

    python scripts/sweep_table_v.py                                  # all rows
    python scripts/sweep_table_v.py --only 1shot_coop 1shot_coop_backmix -- data.seeds=[1]
    python scripts/sweep_table_v.py --resume -- data_root=/datasets

Arguments after ``--`` are config overrides applied to every row.  Output:
``<output_dir>/table_v.md`` and ``table_v.json`` (per row: the aggregated results).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fewshot" / "table_v"
# the paper's row order, with LoRA (not in the paper) beside CoOp / LoCoOp in every setting
ROWS = [f"{s}_{m}{b}" for s in ("1shot", "4shot", "16shot", "full") for m in ("coop", "locoop", "lora")
        for b in ("", "_backmix")]
ROWS += ["full_vpt", "full_vpt_backmix"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help=f"rows to run (default: all): {', '.join(ROWS)}")
    parser.add_argument("--resume", action="store_true", help="reuse finished rows and seeds, resume unfinished ones")
    parser.add_argument("--output-dir", default=None, help="overrides run.output_dir of every row")
    args = parser.parse_args(argv)

    from backmix_vlm.errors import BackmixError
    from backmix_vlm.jobs.fewshot import build_fewshot_config, load_fewshot_config, preflight
    from backmix_vlm.report.tables import paper_table_v
    from backmix_vlm.runners.fewshot import run_fewshot
    from backmix_vlm.atomic import atomic_write_text, write_json
    from backmix_vlm.jobs.runs import find_resume_dir, is_run_dir, new_run_dir, open_run, resume_config

    rows = args.only or ROWS
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.output_dir:
        overrides = [f"run.output_dir={args.output_dir}", *overrides]
    table_rows, out_dir = [], None
    command = ["scripts/sweep_table_v.py", *sys.argv[1:]]
    try:
        for row in rows:
            cfg = load_fewshot_config(CONFIGS / f"{row}.yaml", overrides)
            out_dir = Path(cfg.run.output_dir)
            target = out_dir / cfg.run.name
            done = target / "results.json"
            if args.resume and done.is_file():
                print(f"== {row}: finished, reusing {done}")
                results = json.loads(done.read_text())
            else:
                print(f"== {row}: {cfg.method_label}, {cfg.setting_label}")
                if args.resume and is_run_dir(target):  # unfinished row: continue it with its saved config
                    cfg, plan = resume_config("fewshot", find_resume_dir("fewshot", target, []), overrides,
                                              build_fewshot_config, argv=command)
                else:  # a new row: refuses to overwrite another run in its folder
                    plan = new_run_dir("fewshot", cfg.run.output_dir, cfg.run.name, argv=command)
                preflight(cfg)
                with open_run(plan, cfg) as run_dir:
                    results = run_fewshot(cfg, run_dir, resume=plan.resume)
            table_rows.append({"setting": cfg.setting_label, "method": cfg.method_label, "results": results,
                               "score": cfg.eval.scores[0], "row": row})
            # rewrite the combined table after every row, so an interrupted sweep still has one
            bb = results.get("backbone") or {}
            md = (f"# Table V reproduction: {bb.get('name')} ({bb.get('weights') or 'random init'}), "
                  f"known: {cfg.data.test.display_name}\n\n"
                  + paper_table_v(table_rows)
                  + "\nScores: " + ", ".join(f"{r['row']}: {r['score']}" for r in table_rows) + "\n")
            atomic_write_text(out_dir / "table_v.md", md)
            write_json(out_dir / "table_v.json", [{k: r[k] for k in ("row", "setting", "method", "score", "results")}
                                                  for r in table_rows])
    except BackmixError as e:
        print(f"sweep_table_v: error: {e}", file=sys.stderr)
        return 2
    if out_dir is not None:
        print((out_dir / "table_v.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
