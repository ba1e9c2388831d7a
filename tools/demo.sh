#!/usr/bin/env bash
# The main job: set up .venv (first time: about 20 minutes, mmcv is compiled), then train and evaluate on the
# embedded shapes data (tools/demo.py). Extra arguments go to tools/demo.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup_env.sh"
exec "$root/.venv/bin/python" "$root/tools/demo.py" "$@"
