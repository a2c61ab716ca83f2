"""Offline batch jobs on Ray Data: top-K recommendations for every user (`python -m batch.run`).

See `batch/run.py` and docs/recommend.md.
"""
