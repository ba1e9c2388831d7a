#!/usr/bin/env bash
# Create .venv in the repository root and install the pinned stack (requirements/stack.txt) into it.
# Idempotent: a second run checks the installed stack and returns in seconds.
#   VENV=path      where the environment goes (default: <repo>/.venv)
#   PYTHON=python3 the interpreter that creates it
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
pins=$root/requirements/stack.txt
py=$venv/bin/python

pin() { grep -E "^$1[=<>]" "$pins" | head -n1; }
# --isolated: ignore a pip configuration whose find-links folder holds a CPU torch build (torch-2.13.0+cpu): with
# it, `import torchvision` (a CUDA build) fails with "operator torchvision::nms does not exist". Everything comes
# from the package registry.
pipi() { "$py" -m pip --isolated --disable-pip-version-check install -q "$@"; }

stamp=$venv/.tokenprune-stack
want=$(sha256sum "$pins" "$root/setup.py" | sha256sum | cut -c1-16)
check='import torch, torchvision, mmcv, mmcv.ops, mmengine, mmdet, timm, pycocotools, tokenprune'
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "$check" 2>/dev/null; then
  echo "setup_env: $venv is up to date"
  exit 0
fi

t0=$(date +%s)
[ -x "$py" ] || "${PYTHON:-python3}" -m venv "$venv"
pipi --upgrade pip

have() { "$py" -c "$1" 2>/dev/null; }
tv=$(pin torch | cut -d= -f3); vv=$(pin torchvision | cut -d= -f3)
if ! have "import torch, torchvision; assert torch.__version__.split('+')[0] == '$tv' and torchvision.__version__.split('+')[0] == '$vv'"; then
  echo "setup_env: installing $(pin torch) $(pin torchvision)"
  pipi "$(pin torch)" "$(pin torchvision)"
fi
pipi "$(pin setuptools)" "$(pin wheel)" "$(pin ninja)"

mv=$(pin mmcv | cut -d= -f3)
if ! have "import mmcv, mmcv.ops; assert mmcv.__version__ == '$mv'"; then
  # Compiled with ops and without build isolation (isolated, its setup.py cannot see torch and silently builds
  # without ops): about 14 minutes on 2 cores the first time; pip keeps the built wheel in its cache, so later
  # installs on the same machine take seconds.
  echo "setup_env: building $(pin mmcv) with ops (about 14 minutes on 2 cores the first time)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pipi --no-build-isolation "$(pin mmcv)"
fi
pipi "$(pin mmengine)" "$(pin mmdet)" "$(pin timm)" "$(pin pycocotools)" "$(pin pytest)" "$(pin ruff)"
pipi --no-deps --no-build-isolation -e "$root"

"$py" -c "$check"
echo "$want" > "$stamp"
echo "setup_env: done in $(( $(date +%s) - t0 )) s ($venv)"
