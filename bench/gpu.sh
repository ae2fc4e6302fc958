#!/usr/bin/env bash
# The GPU figures in one command (under 8 minutes on one H100/H200 class GPU):
#
#   bash bench/gpu.sh [--device cuda] [--small] [--out DIR]
#
# 1. bare forward (encode_image, fp16 autocast) frames/s at batch 1, 8, 32 and 64;
# 2. WinCLIP and ALFA engine-only frames/s (1080p frames already on the device, batch 8 and 32);
# 3. end to end at 1080p through embedded tansu: 1, 2 and 4 `linewatch score` processes on the
#    one GPU (nvjpeg decoding on the device, batch 32), WinCLIP and ALFA.
# Figures print as `key=value` rows and go to DIR/*.json (default /tmp/linewatch-gpu-<time>/).
# `--device cpu --small` runs the same steps at toy sizes on a CPU (what the test suite checks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DEVICE=cuda
SMALL=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--small] [--out DIR]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-${TMPDIR:-/tmp}/linewatch-gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

if [ "$SMALL" = 1 ]; then
  BACKBONE=ViT-S-32; BATCHES="1 2"; ENGINE_BATCHES="2"; SIZE=320x240; BATCH=2; ITERS=1
  WORKERS="1 2"; E2E_METHODS="alfa"; ALFA_FRAMES=8; WINCLIP_FRAMES=8; TIMEOUT=300
else
  BACKBONE=ViT-B-16-plus-240; BATCHES="1 8 32 64"; ENGINE_BATCHES="8 32"; SIZE=1920x1080; BATCH=32; ITERS=20
  WORKERS="1 2 4"; E2E_METHODS="alfa winclip"; ALFA_FRAMES=3000; WINCLIP_FRAMES=600; TIMEOUT=150
fi
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
echo "# gpu.sh: device $DEVICE, backbone $BACKBONE, figures in $OUT/"
COMMON=(--backbone "$BACKBONE" --device "$DEVICE" --precision auto --iters "$ITERS")

"$PY" bench/spine.py bare "${COMMON[@]}" --methods alfa --batches $BATCHES --json "$OUT/bare.json"
"$PY" bench/spine.py engine "${COMMON[@]}" --methods winclip alfa --batches $ENGINE_BATCHES --sizes "$SIZE" \
  --json "$OUT/engine.json"
for method in $E2E_METHODS; do
  frames=$ALFA_FRAMES; [ "$method" = winclip ] && frames=$WINCLIP_FRAMES
  "$PY" bench/spine.py e2e "${COMMON[@]}" --methods "$method" --sizes "$SIZE" --batch "$BATCH" --no-free \
    --frames "$frames" --workers $WORKERS --timeout "$TIMEOUT" --json "$OUT/e2e-$method.json"
done
echo "# gpu.sh: done"
