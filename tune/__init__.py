"""Hyper-parameter search on Ray Tune: draft-head transition and training knobs, then beam width at decode time.

`python tune/run.py --config tune/configs/quick.yaml`; see `tune/run.py` and docs/tuning.md.
"""
