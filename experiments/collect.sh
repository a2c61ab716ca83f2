#!/usr/bin/env bash
# Copy an experiment's result files (not its checkpoints) from runs/exp/GRID into results/GRID for the repo:
#   bash experiments/collect.sh beauty-main [SRC]
# Every finished run's result.json and ranks.npz (each test user's rank per evaluation row, int16,
# compressed) go to results/GRID/runs/RUN/ (.gitignore un-ignores results/*/runs/), so the tables can be
# recomputed from the repository alone:
#   python experiments/summarize.py results/GRID
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
  [ -f "$run/ranks.npz" ] || { echo "$run has result.json but no ranks.npz" >&2; exit 2; }
  mkdir -p "$dst/runs/$(basename "$run")"
  cp "$run"/{result.json,ranks.npz} "$dst/runs/$(basename "$run")/"
done
echo "copied $(ls "$dst/runs" | wc -l) runs ($(du -sh "$dst/runs" | cut -f1)) to $dst"
