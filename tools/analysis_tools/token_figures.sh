#!/usr/bin/env bash
# Regenerate the pictures and numbers of docs/visualization.md from the main job's checkpoints
# (bash tools/demo.sh writes them): token pictures of two val images for the dense model, SViT and ToMe
# (training-free merging on the dense checkpoint), and SViT's token statistics over the 100 val images.
#
#   bash tools/analysis_tools/token_figures.sh
#
# Environment: PYTHON (default .venv/bin/python), DENSE_CKPT, SVIT_CKPT (default the main job's),
# INDICES (val images to draw, default "0 1"), OUT (default docs/images), WORK (default work_dirs/token_figures).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv/bin/python}
DENSE_CFG=configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py
SVIT_CFG=configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py
DENSE_CKPT=${DENSE_CKPT:-work_dirs/demo/dense/iter_400.pth}
SVIT_CKPT=${SVIT_CKPT:-work_dirs/demo/svit/iter_150.pth}
INDICES=${INDICES:-0 1}
OUT=${OUT:-docs/images}
WORK=${WORK:-work_dirs/token_figures}
# ToMe on the dense model at the blocks SViT gates, keeping 0.875 of the tokens at each: 0.30 after block 11
TOME=(model.backbone.reducer.type=ToMe "model.backbone.reducer.blocks=[3,4,5,6,7,8,9,10,11]"
      model.backbone.reducer.keep_ratio=0.875)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

draw() {  # name config checkpoint [cfg-options...]
    local name=$1 cfg=$2 ckpt=$3
    shift 3
    local opts=()
    [ $# -gt 0 ] && opts=(--cfg-options "$@")
    # shellcheck disable=SC2086
    "$PY" tools/analysis_tools/visualize_tokens.py "$cfg" "$ckpt" --split val --indices $INDICES \
        --out-dir "$OUT/tokens_$name" "${opts[@]}"
}

stats() {  # name config checkpoint [cfg-options...]
    local name=$1 cfg=$2 ckpt=$3
    shift 3
    local opts=()
    [ $# -gt 0 ] && opts=(--cfg-options "$@")
    "$PY" tools/analysis_tools/token_stats.py "$cfg" "$ckpt" --split val --out-dir "$WORK/$name" "${opts[@]}" \
        | tee "$WORK/$name.txt"
}

mkdir -p "$OUT" "$WORK"
draw dense "$DENSE_CFG" "$DENSE_CKPT"
draw svit "$SVIT_CFG" "$SVIT_CKPT"
stats svit "$SVIT_CFG" "$SVIT_CKPT"
mkdir -p "$OUT/stats_svit"
cp "$WORK"/svit/*.png "$OUT/stats_svit/"
if "$PY" -c "import sys; sys.path.insert(0, 'projects'); from tokenprune.models.reducers import REDUCERS; \
sys.exit('ToMe' not in REDUCERS)"; then
    draw tome "$DENSE_CFG" "$DENSE_CKPT" "${TOME[@]}"
    stats tome "$DENSE_CFG" "$DENSE_CKPT" "${TOME[@]}"
else
    echo "ToMe is not among the reducers yet: no merging pictures"
fi
echo "figures in $OUT, statistics (JSON, tables) in $WORK"
