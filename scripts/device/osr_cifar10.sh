#!/usr/bin/env bash
# One GPU session of issue 8 (<= 8 minutes of one H200), or --smoke on a CPU (a few minutes):
#   1. CUDA check: device views, frame-consistent bank update, BackMix mixing, CAM agree with the CPU;
#   2. the fast recipe (airbench-class net, 10 epochs) on all 5 CIFAR-10 6/4 splits, Plain vs + BackMix;
#   3. the paper's setting (WRN-40-4, SGD 0.1 cosine, 100 epochs, Plain vs + BackMix) on as many splits
#      as the remaining budget allows: one probe epoch measures the throughput first, then the epochs /
#      splits are chosen (printed; fewer than 100 epochs only if not even one split fits).
# Prints the tables and writes JSON under $OUT (the device tool's output folder) or runs/device.
#
# Prepare once on a machine that has ../shared:  python scripts/device/prepare_data.py
# Then (device machine, no installs):            bash scripts/device/osr_cifar10.sh
# Needs: torch, torchvision, timm, accelerate, safetensors, scikit-learn, PyYAML (no open_clip).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=0; [ "${1:-}" = "--smoke" ] && SMOKE=1
BUDGET_S=${BUDGET_S:-450}          # seconds for steps 2-3 (the CUDA check and start-up come on top)
DATA=data/device
OUTDIR=${OUT:-runs/device}
mkdir -p "$OUTDIR"
start=$(date +%s)
[ -f "$DATA/cifar10_jpg.tar.gz" ] || { echo "missing $DATA/cifar10_jpg.tar.gz: run scripts/device/prepare_data.py" >&2; exit 2; }
[ -d "$DATA/cifar10/train" ] || { mkdir -p "$DATA/cifar10" && tar -xzf "$DATA/cifar10_jpg.tar.gz" -C "$DATA/cifar10"; }
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

if [ $SMOKE = 1 ]; then
  DEV=cpu; COMMON=(--smoke --device cpu); SPLITS_FAST=(0); OUTDIR="$OUTDIR/smoke"
else
  DEV=cuda; COMMON=(--device cuda); SPLITS_FAST=(0 1 2 3 4)
  python scripts/osr_cifar10.py --cuda-check
fi

# 2. fast recipe on every split
python scripts/osr_cifar10.py "${COMMON[@]}" --data-root "$DATA" --out "$OUTDIR/fast" --recipe fast \
  --splits "${SPLITS_FAST[@]}" --set data.num_workers=8

# 3. paper setting: probe one epoch, then fit the budget
python scripts/osr_cifar10.py "${COMMON[@]}" --data-root "$DATA" --out "$OUTDIR/probe" --recipe paper \
  --splits 0 --epochs 1 --set data.num_workers=8
left=$(( BUDGET_S - ($(date +%s) - start) ))
read EPOCHS NSPLITS < <(python - "$OUTDIR/probe" "$left" $SMOKE <<'PY'
import json, sys
from pathlib import Path
probe, left, smoke = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
per_epoch = sum(json.loads(p.read_text().splitlines()[-1])["time"]
                for p in probe.glob("*/*/log.jsonl"))          # plain + backmix, one epoch each
overhead = 30.0                                                # start-up + final evaluation per split
if smoke:
    print(1, 1); sys.exit()
splits = int(max(0.0, left) // (100 * per_epoch + overhead))
if splits >= 1:
    print(100, min(5, splits))
else:
    print(max(1, int((left - overhead) // per_epoch)), 1)
print(f"probe: {per_epoch:.1f} s per epoch (plain + BackMix), {left:.0f} s left", file=sys.stderr)
PY
)
echo "paper setting: WRN-40-4, $EPOCHS epochs, $NSPLITS split(s)"
python scripts/osr_cifar10.py "${COMMON[@]}" --data-root "$DATA" --out "$OUTDIR/paper" --recipe paper \
  --splits $(seq 0 $((NSPLITS - 1))) --epochs "$EPOCHS" --set data.num_workers=8

cat "$OUTDIR/fast/table.md" "$OUTDIR/paper/table.md"
echo "total $(( $(date +%s) - start )) s; results in $OUTDIR/{fast,paper}/table.{md,json}"
