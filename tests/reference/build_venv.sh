#!/usr/bin/env bash
# Build the *reference* venv used to generate tests/reference/fixtures/*.npz and to run
# bench/anomalib_reference.py.
#
# Why a separate venv: anomalib's WinCLIP (2.7.0) permutes tokens to sequence-first before calling
# `visual.transformer`, which is only correct for open_clip < 2.26 (later releases are batch-first).
# linewatch itself uses current open_clip, so the reference side is pinned to open_clip_torch==2.24.0.
#
# What gets installed: torch/torchvision (the same releases as the project venv; pip's global
# constraint file /etc/xdg/pip/constraints.txt caps them at torch<=2.14.1 / torchvision<=0.29.1 and
# must stay), open_clip_torch==2.24.0, and anomalib==2.7.0 with its *core* dependencies only (no
# extras). That core set is in effect the minimal one: importing
# `anomalib.models.image.winclip.torch_model` and `anomalib.metrics.AUPRO` goes through anomalib/__init__,
# anomalib.data, anomalib.models and anomalib.metrics and loads lightning, torchmetrics, kornia, FrEIA,
# timm, einops, jsonargparse, omegaconf, opencv-python-headless, scikit-image, scikit-learn, pandas,
# matplotlib, imagecodecs, tifffile, rich, ... (checked: every core dependency but docstring-parser and
# rich-argparse is imported), so a --no-deps install would only re-list them by hand and drift.
# No optional extras ([clip] would only add open_clip, pinned explicitly here; [dev] pulls openvino,
# mlflow, wandb, ...).
#
# Idempotent: an existing venv is reused, and pip skips already-satisfied pins. The final import
# check fails loudly if anything is missing.
#
# Usage (from the repo root):  bash tests/reference/build_venv.sh
set -euo pipefail

REF_VENV="${REF_VENV:-/tmp/linewatch-refvenv}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$REF_VENV/bin/python" ]]; then
    echo "creating reference venv at $REF_VENV"
    "$PYTHON" -m venv "$REF_VENV"
    "$REF_VENV/bin/python" -m pip install --quiet --upgrade pip
else
    echo "reusing reference venv at $REF_VENV"
fi

"$REF_VENV/bin/python" -m pip install --quiet \
    'torch==2.14.1' \
    'torchvision==0.29.1' \
    'open_clip_torch==2.24.0' \
    'anomalib==2.7.0'

# Fail early if the environment cannot do what make_fixtures.py / the benchmark need.
"$REF_VENV/bin/python" - <<'PY'
import anomalib
import torch
from open_clip.version import __version__ as open_clip_version  # 2.24.0 does not re-export it
from anomalib.metrics import AUPRO  # noqa: F401
from anomalib.models.image.winclip.torch_model import WinClipModel  # noqa: F401

assert open_clip_version == "2.24.0", open_clip_version
print(f"reference venv OK: torch {torch.__version__}, open_clip {open_clip_version}, "
      f"anomalib {anomalib.__version__}")
PY
