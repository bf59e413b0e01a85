#!/usr/bin/env bash
# The training-methods table (scripts/training_methods.py) at ResNet-18 scale on one GPU (<= 8 minutes of one
# H100), or --smoke on a CPU (a tiny run):
#   1. a probe: one epoch of ResNet-18 (configs/cnn/cifar10_osr_resnet18.yaml: SGD 0.1 cosine, batch 128;
#      here bf16 + channels_last) for the plain method, Plain + BackMix, on CIFAR-10 6/4 split 0;
#   2. the epochs that fit the budget for every method (plain, logitnorm, oe, rotpred, arpl) x {Plain,
#      + BackMix} x $SEEDS: each method's cost relative to plain is its rows per step (OE: + 2B outliers,
#      RotPred: 4B rotations); the plan is printed.  Far fewer than the published 100 epochs: the table
#      says how many.
# Records go to $OUT/methods/runs.jsonl (scripts/training_methods.py's format, with the GPU's name) and runs.md.
#
# Prepare once on a machine that has ../shared:  python scripts/device/prepare_data.py
#   (CIFAR-10 archive, CIFAR-100 / Tiny-ImageNet test subsets, Tiny-ImageNet val = OE's outliers, MNIST, DTD)
# Then (device machine, no installs):            bash scripts/device/training_methods.sh
# CPU check:   bash scripts/device/training_methods.sh --smoke [--set key=value ...]   (tests/test_training_methods_script.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=0; [ "${1:-}" = "--smoke" ] && { SMOKE=1; shift; }   # further arguments go to training_methods.py
BUDGET_S=${BUDGET_S:-420}          # seconds for steps 1-2
SEEDS=${SEEDS:-0}
METHODS=${METHODS:-plain logitnorm oe rotpred arpl}
DATA=${DATA:-data/device}
OUTDIR=${OUT:-runs/device}/methods
mkdir -p "$OUTDIR"
start=$(date +%s)
[ -f "$DATA/cifar10_jpg.tar.gz" ] || [ -d "$DATA/cifar10/train" ] || { echo "missing $DATA/cifar10_jpg.tar.gz: run scripts/device/prepare_data.py" >&2; exit 2; }
[ -d "$DATA/cifar10/train" ] || { mkdir -p "$DATA/cifar10" && tar -xzf "$DATA/cifar10_jpg.tar.gz" -C "$DATA/cifar10"; }
[ -d "$DATA/dtd_partial" ] || [ ! -f "$DATA/dtd_partial_160px.tar.gz" ] || tar -xzf "$DATA/dtd_partial_160px.tar.gz" -C "$DATA"
SETS=()
[ -d "$DATA/cifar100" ] && SETS+=(CIFAR-100)
[ -d "$DATA/tiny-imagenet-200/test" ] && SETS+=(TIN)
[ -d "$DATA/mnist" ] && SETS+=(MNIST)
[ -d "$DATA/dtd_partial" ] && SETS+=(Textures)
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ $SMOKE = 1 ]; then
  COMMON=(--smoke --device cpu); EXTRA=(--set data.num_workers=0 --set eval.num_workers=0)
else
  COMMON=(--device cuda); EXTRA=(--set data.num_workers=8 --set eval.num_workers=8 --set run.precision=bf16
                                 --set run.channels_last=true --set data.cache=memory --set eval.batch_size=1000)
fi
RUN=(python scripts/training_methods.py --recipe resnet18 "${COMMON[@]}" --data-root "$DATA" --sets "${SETS[@]}"
     "${EXTRA[@]}" "$@")

# 1. probe (its records stay in the probe folder)
"${RUN[@]}" --out "$OUTDIR/probe" --results "$OUTDIR/probe/runs.jsonl" --methods plain --seeds 0 --epochs 1
left=$(( BUDGET_S - ($(date +%s) - start) ))
EPOCHS=$(python - "$OUTDIR/probe" "$left" $SMOKE "$METHODS" "$SEEDS" <<'PY'
import json, sys
from pathlib import Path
probe, left, smoke = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
methods, seeds = sys.argv[4].split(), sys.argv[5].split()
if smoke:
    print(1); sys.exit()
logs = {p.parent.name: json.loads(p.read_text().splitlines()[-1])["time"] for p in probe.glob("*/*/log.jsonl")}
plain, backmix = logs.get("plain", 0.0), logs.get("backmix", 0.0)   # seconds per epoch; BackMix rows = 2B
# rows per step relative to the method's own batch: OE adds 2B outliers, RotPred 3 more rotations of every row
cost = {"plain": 1.0, "logitnorm": 1.0, "arpl": 1.0}
per_epoch = 0.0
for m in methods:
    if m == "oe":
        per_epoch += plain * 3 + backmix * 2
    elif m == "rotpred":
        per_epoch += 4 * (plain + backmix)
    else:
        per_epoch += plain + backmix
overhead = 30.0 * len(methods)                               # start-up, decoding, evaluation per run folder
epochs = int(min(100, max(1, (left - overhead * len(seeds)) // (per_epoch * len(seeds)))))
print(f"probe: plain {plain:.1f} s, + BackMix {backmix:.1f} s per epoch; {left:.0f} s left for {len(methods)} "
      f"method(s) x {len(seeds)} seed(s) x 2 variants: {epochs} epochs", file=sys.stderr)
print(epochs)
PY
)
echo "training methods: ${EPOCHS} epochs, methods: $METHODS, seeds: $SEEDS, sets: ${SETS[*]:-none}"
"${RUN[@]}" --out "$OUTDIR/table" --results "$OUTDIR/runs.jsonl" --methods $METHODS --seeds $SEEDS --epochs "$EPOCHS"
echo "total $(( $(date +%s) - start )) s; records in $OUTDIR/runs.jsonl, table in $OUTDIR/runs.md"
