#!/usr/bin/env bash
# Copy an experiment's result files (not its checkpoints) from runs/exp/GRID into results/GRID for the repo:
#   bash experiments/collect.sh beauty-main
set -euo pipefail
grid=$1
src=${2:-runs/exp/$grid}
dst=results/$grid
[ -f "$src/summary.json" ] || { echo "no $src/summary.json: run nezha experiment first" >&2; exit 2; }
mkdir -p "$dst/runs"
cp "$src"/{summary.json,results.md,experiment.json} "$dst"/
for f in curves.png width_sweep.json; do [ -f "$src/$f" ] && cp "$src/$f" "$dst/"; done
for run in "$src"/runs/*/; do
  [ -f "$run/result.json" ] || continue
  mkdir -p "$dst/runs/$(basename "$run")"
  cp "$run"/{result.json,ranks.npz} "$dst/runs/$(basename "$run")/"
done
echo "copied $(ls "$dst/runs" | wc -l) runs to $dst"
