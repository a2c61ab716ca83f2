"""Inputs and readers shared by the tests of `nezha recommend` (test_recommend.py) and batch/run.py
(test_batch.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

GOOD = [
    {"user_id": "u1", "history": ["I001", "I002", "I003"]},
    {"user_id": "u2", "history": ["I010", "I011"]},
    {"user_id": "u3", "history": ["I040", "I041", "I042", "I043", "I044"]},
    {"user_id": "u4", "history": ["I020"]},
]
# Line numbers (1-based) are part of what the report must say.
BAD_LINES = [
    json.dumps({"user_id": "ok1", "history": ["I005", "I006"]}),  # 1
    json.dumps({"user_id": "partly", "history": ["I007", "GONE-1", "I008"]}),  # 2: one unknown item
    json.dumps({"user_id": "nobody", "history": ["GONE-2", "GONE-3"]}),  # 3: no known item
    json.dumps({"user_id": "empty", "history": []}),  # 4
    "{this is not json",  # 5
    json.dumps({"history": ["I001"]}),  # 6: no user_id
    json.dumps({"user_id": "flat", "history": "I001"}),  # 7: not a list
    "",  # 8: blank, ignored
    json.dumps({"user_id": "ok2", "history": ["I030"]}),  # 9
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_recs(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()  # a file, or Ray's folder of part files


def read_report(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
