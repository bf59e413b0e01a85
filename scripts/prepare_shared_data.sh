#!/usr/bin/env bash
# Unpack the project's real-data archives (cifar10_jpg.tar.gz, cifar100_test_png.tar.gz, ...) into
# one folder, so that a single data_root serves every set:  <dst>/cifar10/{train,test}/<class>/*.jpg
# (CIFAR-10, JPEG q~75), <dst>/cifar100/test/<class>/*.png, <dst>/tiny-imagenet-200/, <dst>/dtd_partial/,
# <dst>/mnist/, <dst>/fashion_mnist/.  Then point the jobs at it: export BACKMIX_DATA=<dst>.
# (Public datasets without these archives: python scripts/prepare_data.py.)
#
#   bash scripts/prepare_shared_data.sh [ARCHIVE_DIR] [DST]    (defaults: ../shared/data, $BACKMIX_DATA or ./data)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$here/../shared/data}"
dst="${2:-${BACKMIX_DATA:-data}}"
[ -d "$src" ] || { echo "prepare_shared_data: no folder $src" >&2; exit 2; }
mkdir -p "$dst"
for f in cifar10_jpg cifar100_test_png tinyimagenet_val_test dtd_partial_160px; do
  stamp="$dst/.done_$f"
  if [ -f "$src/$f.tar.gz" ] && [ ! -f "$stamp" ]; then
    echo "unpacking $f.tar.gz -> $dst"
    out="$dst"; [ "$f" = cifar10_jpg ] && out="$dst/cifar10" && mkdir -p "$out"
    tar -xzf "$src/$f.tar.gz" -C "$out" && touch "$stamp"
  fi
done
for d in mnist fashion_mnist; do
  [ -d "$src/$d" ] && mkdir -p "$dst/$d" && cp -n "$src/$d"/*.gz "$dst/$d/" 2>/dev/null || true
done
echo "data ready in $dst; use it with: export BACKMIX_DATA=$(cd "$dst" && pwd)"
