#!/usr/bin/env bash
# The field-level open-set baseline on one GPU (<= 8 minutes of one H100), or --smoke on a CPU:
#   1. a probe: one epoch of the field recipe (Plain + BackMix) on CIFAR-10 6/4 split 0 measures the
#      throughput; the plan is printed;
#   2. the field recipe (configs/cnn/cifar10_field.yaml, its own epochs) on as many of the 5 splits as
#      the budget allows, Plain vs + BackMix;
#   3. with the time left, the longest schedule that fits (up to 200 epochs: Vaze et al. train for
#      hundreds) on split 0, Plain vs + BackMix: where the AUROC-vs-budget curve goes.
# Records go to $OUT/runs.jsonl (scripts/field_baseline.py's format, with the GPU's name) and tables.
#
# Prepare once on a machine that has ../shared:  python scripts/device/prepare_data.py
# Then (device machine, no installs):            bash scripts/device/field_baseline.sh
# CPU check:   bash scripts/device/field_baseline.sh --smoke [--set key=value ...]   (tests/test_field_baseline.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=0; [ "${1:-}" = "--smoke" ] && { SMOKE=1; shift; }   # further arguments go to field_baseline.py
BUDGET_S=${BUDGET_S:-420}          # seconds for steps 1-3
DATA=${DATA:-data/device}
OUTDIR=${OUT:-runs/device}/field
mkdir -p "$OUTDIR"
start=$(date +%s)
[ -f "$DATA/cifar10_jpg.tar.gz" ] || [ -d "$DATA/cifar10/train" ] || { echo "missing $DATA/cifar10_jpg.tar.gz: run scripts/device/prepare_data.py" >&2; exit 2; }
[ -d "$DATA/cifar10/train" ] || { mkdir -p "$DATA/cifar10" && tar -xzf "$DATA/cifar10_jpg.tar.gz" -C "$DATA/cifar10"; }
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ $SMOKE = 1 ]; then
  COMMON=(--smoke --device cpu); EXTRA=(--set data.num_workers=0 --set eval.num_workers=0)
else
  COMMON=(--device cuda); EXTRA=(--set data.num_workers=8 --set eval.num_workers=8)
fi
RUN=(python scripts/field_baseline.py "${COMMON[@]}" --data-root "$DATA" "${EXTRA[@]}" "$@")

# 1. probe
"${RUN[@]}" --out "$OUTDIR/probe" --results "$OUTDIR/probe/runs.jsonl" --splits 0 --epochs 1
left=$(( BUDGET_S - ($(date +%s) - start) ))
read EPOCHS NSPLITS LONG < <(python - "$OUTDIR/probe" "$left" $SMOKE configs/cnn/cifar10_field.yaml <<'PY'
import json, sys
from pathlib import Path
import yaml
probe, left, smoke = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
epochs = int(yaml.safe_load(Path(sys.argv[4]).read_text())["optim"]["epochs"])
per_epoch = sum(json.loads(p.read_text().splitlines()[-1])["time"] for p in probe.glob("*/*/log.jsonl"))
overhead = 25.0                                            # start-up + final evaluation per split
if smoke:
    print(1, 1, 0); sys.exit()
split_cost = epochs * per_epoch + overhead
n = int(min(5, max(0, left) // split_cost))
rest = left - n * split_cost
long_epochs = int(min(200, (rest - overhead) // per_epoch)) if rest > overhead else 0
print(f"probe: {per_epoch:.2f} s per epoch (Plain + BackMix), {left:.0f} s left: {n} split(s) at {epochs} "
      f"epochs, then {long_epochs} epochs on split 0", file=sys.stderr)
print(epochs if n else max(1, int((left - overhead) // per_epoch)), max(1, n), long_epochs if long_epochs > epochs else 0)
PY
)
echo "field recipe: $EPOCHS epochs on $NSPLITS split(s); longer schedule: ${LONG} epochs"
"${RUN[@]}" --out "$OUTDIR/field" --results "$OUTDIR/runs.jsonl" --splits $(seq 0 $((NSPLITS - 1))) --epochs "$EPOCHS"
if [ "$LONG" -gt 0 ]; then
  "${RUN[@]}" --out "$OUTDIR/long" --results "$OUTDIR/runs_long.jsonl" --splits 0 --epochs "$LONG"
fi
echo "total $(( $(date +%s) - start )) s; records in $OUTDIR/runs*.jsonl, tables in $OUTDIR/table.md"
