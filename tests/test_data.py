import gzip
import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from nezha.data.amazon import load_amazon_raw
from nezha.data.datasets import (
    DataError,
    default_data_dir,
    load_dataset,
    resolve_data_dir,
    resolve_dataset_dir,
    write_dataset,
)
from nezha.data.split import Split, leave_one_out, load_sequences, pack_ragged, save_sequences

ITEMS = [
    {"item_id": "a", "title": "Red Lipstick", "brand": "Acme", "categories": ["Beauty", "Makeup", "Lips"]},
    {"item_id": "b", "title": "Face Cream", "brand": "", "categories": ["Beauty", "Skin Care"]},
    {"item_id": "c", "title": "", "brand": "Acme", "categories": []},
    {"item_id": "d", "title": None, "brand": None, "categories": None},
]


def write_dir(path, items=ITEMS, interactions="user_id,item_id,position\nu1,b,1\nu1,a,0\nu2,c,0\nu1,c,2\nu2,a,1\n"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items) if isinstance(items, list) else items)
    (path / "interactions.csv").write_text(interactions)
    return path


# ---- directory format -------------------------------------------------------------------------------


def test_load_dataset_orders_by_position_and_builds_text(tmp_path):
    ds = load_dataset(write_dir(tmp_path / "toy"))
    assert ds.user_ids == ["u1", "u2"]  # order of first appearance
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2], [2, 0]]
    assert all(s.dtype == np.int64 for s in ds.sequences)
    assert ds.items["text"].tolist() == [
        "Red Lipstick | Brand: Acme | Categories: Beauty > Makeup > Lips",
        "Face Cream | Categories: Beauty > Skin Care",
        "Brand: Acme",
        "d",  # no text at all: the item id stands in
    ]
    assert ds.items["categories"].tolist()[3] == []
    assert ds.stats["items_missing_title"] == 2
    assert ds.stats["items_without_text"] == 1
    assert ds.stats["items_without_interactions"] == 1
    assert ds.stats["num_interactions"] == 5 and ds.stats["unknown_item_interactions"] == 0


def test_unknown_items_are_dropped_with_a_count(tmp_path, caplog):
    inter = "user_id,item_id,position\nu1,a,0\nu1,zz,1\nu1,b,2\nu2,zz,0\nu2,yy,1\n"
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(write_dir(tmp_path / "toy", interactions=inter))
    assert "dropping 3 interaction(s) with 2 item id(s)" in caplog.text
    assert ds.stats["unknown_item_interactions"] == 3
    assert ds.user_ids == ["u1"] and ds.sequences[0].tolist() == [0, 1]


def test_malformed_json_line_names_file_and_line(tmp_path):
    items = json.dumps(ITEMS[0]) + "\n{not json\n"
    with pytest.raises(DataError, match=r"items\.jsonl:2: malformed JSON"):
        load_dataset(write_dir(tmp_path / "toy", items=items))


def test_item_line_without_id(tmp_path):
    items = json.dumps(ITEMS[0]) + "\n" + json.dumps({"title": "x"}) + "\n"
    with pytest.raises(DataError, match=r"items\.jsonl:2: missing 'item_id'"):
        load_dataset(write_dir(tmp_path / "toy", items=items))


def test_duplicate_item_ids(tmp_path):
    with pytest.raises(DataError, match=r"1 duplicate item id\(s\), e\.g\. \['a'\]"):
        load_dataset(write_dir(tmp_path / "toy", items=[*ITEMS, ITEMS[0]]))


def test_empty_catalog(tmp_path):
    with pytest.raises(DataError, match="empty catalog"):
        load_dataset(write_dir(tmp_path / "toy", items="\n"))


def test_missing_columns_and_files(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['position or timestamp'\]"):
        load_dataset(write_dir(tmp_path / "toy", interactions="user_id,item_id\nu1,a\n"))
    with pytest.raises(DataError, match=r"interactions\.csv:3: position 'x' is not an integer"):
        load_dataset(write_dir(tmp_path / "toy2", interactions="user_id,item_id,position\nu1,a,0\nu1,b,x\n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"missing items\.jsonl, interactions\.csv \(or interactions\.json\); "
                       r"items\.jsonl may be left out only when the semantic IDs come from a file"):
        load_dataset(tmp_path / "empty")


def test_no_interactions_with_known_items(tmp_path):
    with pytest.raises(DataError, match="no interactions with known items"):
        load_dataset(write_dir(tmp_path / "toy", interactions="user_id,item_id,position\nu1,zz,0\n"))


# ---- interactions.json and a catalog fixed by semantic-ID files ---------------------------------------


def write_json_dir(path, interactions, items=ITEMS):
    path.mkdir(parents=True, exist_ok=True)
    if items is not None:
        (path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (path / "interactions.json").write_text(interactions if isinstance(interactions, str) else json.dumps(interactions))
    return path


def test_interactions_json_is_ordered_lists_per_user(tmp_path):
    ds = load_dataset(write_json_dir(tmp_path / "toy", {"u1": ["a", "b", "c"], "u2": ["c", "a"], "u3": []}))
    assert ds.user_ids == ["u1", "u2"]  # a user with an empty list has no interactions
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2], [2, 0]]
    assert ds.stats["num_interactions"] == 5
    # item ids may be integers (LC-Rec / LETTER number their items); they match string ids
    items = [{"item_id": "0", "title": "zero"}, {"item_id": "1", "title": "one"}]
    ds = load_dataset(write_json_dir(tmp_path / "ints", {"7": [1, 0, 1]}, items=items))
    assert ds.user_ids == ["7"] and ds.sequences[0].tolist() == [1, 0, 1]


def test_interactions_json_drops_unknown_items_with_a_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(write_json_dir(tmp_path / "toy", {"u1": ["a", "zz", "b"], "u2": ["zz", "yy"]}))
    assert "dropping 3 interaction(s) with 2 item id(s) not in items.jsonl" in caplog.text
    assert ds.stats["unknown_item_interactions"] == 3 and ds.sequences[0].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("interactions", "message"),
    [
        ({"u1": "a"}, r"user 'u1': expected a list of item ids, got a str"),
        ({"u1": ["a", None]}, r"user 'u1', position 1: an item id is a non-empty string or an integer, got None"),
        ({"u1": ["a", ""]}, r"user 'u1', position 1: an item id is"),
        ({"u1": [["a"]]}, r"user 'u1', position 0"),
        ({"": ["a"]}, r"empty user id"),
        ({}, r"empty object \(no users\)"),
        ([["a", "b"]], r"expected a JSON object keyed by user, got a list"),
        ("", r"empty file"),
        ('{"u1": ["a"],\n "u1": ["b"]}', r"user 'u1' appears twice"),
        ('{"u1": ["a"]\n', r"interactions\.json:2: malformed JSON"),
        ({"u1": ["zz"]}, r"no interactions with known items \(items in items\.jsonl\)"),
    ],
)
def test_interactions_json_errors(tmp_path, interactions, message):
    with pytest.raises(DataError, match=message):
        load_dataset(write_json_dir(tmp_path / "toy", interactions))


def test_both_interaction_files_is_an_error(tmp_path):
    path = write_json_dir(write_dir(tmp_path / "toy"), {"u1": ["a"]})
    with pytest.raises(DataError, match="both interactions.csv and interactions.json exist; remove the one"):
        load_dataset(path)


def test_item_ids_fix_the_catalog(tmp_path, caplog):
    # catalog = the given ids in their order; text where items.jsonl has it; its other items left out
    path = write_json_dir(tmp_path / "toy", {"u1": ["new", "a", "b"], "u2": ["b", "c"]})
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path, item_ids=["b", "new", "a"])
    assert ds.items["item_id"].tolist() == ["b", "new", "a"]
    assert ds.items["title"].tolist() == ["Face Cream", "", "Red Lipstick"]
    assert [s.tolist() for s in ds.sequences] == [[1, 2, 0], [0]]
    assert ds.stats["items_without_semantic_id"] == 2  # c and d
    assert ds.stats["unknown_item_interactions"] == 1  # u2's c
    assert "leaving out 2 item(s) that have no semantic ID" in caplog.text
    assert "not in the semantic-ID file" in caplog.text

    # items.jsonl may then be absent: the items are the ids alone
    bare = write_json_dir(tmp_path / "bare", {"u1": ["x", "y"]}, items=None)
    ds = load_dataset(bare, item_ids=["x", "y", "z"])
    assert ds.items["item_id"].tolist() == ["x", "y", "z"] and ds.stats["items_without_text"] == 3
    assert ds.stats["items_without_interactions"] == 1
    with pytest.raises(DataError, match=r"missing items\.jsonl;"):
        load_dataset(bare)
    with pytest.raises(DataError, match=r"no interactions with known items \(items in the semantic-ID file\)"):
        load_dataset(bare, item_ids=["z"])
    with pytest.raises(DataError, match=r"items\.jsonl: 1 duplicate item id\(s\), e\.g\. \['a'\]"):
        load_dataset(write_json_dir(tmp_path / "dup", {"u1": ["a"]}, items=[*ITEMS, ITEMS[0]]), item_ids=["a"])


def test_resolve_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="pass --data-dir DIR or set NEZHA_DATA_DIR"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("NEZHA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    monkeypatch.setenv("NEZHA_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="NEZHA_DATA_DIR="):
        resolve_data_dir(None)
    monkeypatch.delenv("NEZHA_DATA_DIR")
    assert default_data_dir().parts[-2:] == ("shared", "data")

    write_dir(tmp_path / "toy")
    assert resolve_dataset_dir("toy", tmp_path) == tmp_path / "toy"
    assert resolve_dataset_dir(str(tmp_path / "toy"), None) == (tmp_path / "toy").resolve()
    with pytest.raises(DataError, match=r"dataset 'other' not found .* available: \['toy'\]"):
        resolve_dataset_dir("other", tmp_path)
    # a directory with only interactions.json (its semantic IDs come from a file) is a dataset too
    write_json_dir(tmp_path / "ids-only", {"u1": ["a"]}, items=None)
    assert resolve_dataset_dir(str(tmp_path / "ids-only"), None) == (tmp_path / "ids-only").resolve()
    with pytest.raises(DataError, match=r"available: \['ids-only', 'toy'\]"):
        resolve_dataset_dir("other", tmp_path)


def test_real_beauty_counts():
    try:
        path = resolve_dataset_dir("amazon-beauty", None)
    except DataError as exc:
        pytest.skip(f"real dataset not available: {exc}")
    ds = load_dataset(path)
    assert ds.num_items == 12_035 and ds.num_users == 19_383
    assert ds.stats["num_interactions"] == 138_870
    assert min(len(s) for s in ds.sequences) >= 2
    split = leave_one_out(ds.sequences)
    assert len(split.test) == len(split.valid) == ds.num_users - split.skipped_users
    assert split.skipped_users == sum(len(s) < 3 for s in ds.sequences)
    assert len(split.train) == sum(len(s) - 3 for s in ds.sequences if len(s) >= 3)


# ---- original Amazon files --------------------------------------------------------------------------


def write_raw(tmp_path, reviews, meta, gz=True):
    rpath = tmp_path / ("reviews.json.gz" if gz else "reviews.json")
    text = "".join(json.dumps(r) + "\n" for r in reviews)
    if gz:
        with gzip.open(rpath, "wt") as f:
            f.write(text)
    else:
        rpath.write_text(text)
    mpath = tmp_path / "meta.json"
    mpath.write_text("".join(m + "\n" for m in meta))
    return rpath, mpath


def review(user, item, t):
    return {"reviewerID": user, "asin": item, "unixReviewTime": t, "overall": 5.0}


def test_amazon_raw_k_core_cascades(tmp_path):
    # k=2. Iteration 1 removes item c (1 review) and user u4 (1 review); that leaves item d with 1
    # review (iteration 2), and then u3 with none. Only u1, u2 x a, b survive.
    reviews = [
        review("u1", "b", 20), review("u1", "a", 10),
        review("u2", "a", 5), review("u2", "b", 5),  # tie: file order kept
        review("u3", "c", 1), review("u3", "d", 2),
        review("u4", "d", 3),
        review("u5", "zz", 4),  # item missing from the metadata
    ]
    meta = [
        # 2014 format: Python literal, categories as a list of paths
        "{'asin': 'a', 'title': 'Lipstick', 'brand': 'Acme', 'categories': [['Beauty', 'Makeup'], ['Sale']]}",
        json.dumps({"asin": "b", "title": "Cream", "category": ["Beauty", "Skin"]}),  # 2018 format
        json.dumps({"asin": "c", "title": "C"}),
        json.dumps({"asin": "d", "title": "D"}),
    ]
    ds = load_amazon_raw(*write_raw(tmp_path, reviews, meta), k_core=2)
    assert ds.items["item_id"].tolist() == ["a", "b"]
    assert ds.items["categories"].tolist() == [["Beauty", "Makeup"], ["Beauty", "Skin"]]
    assert ds.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1], [0, 1]]
    assert ds.stats["unknown_item_interactions"] == 1 and ds.stats["raw_interactions"] == 8

    # written in the directory format, it loads back identically
    back = load_dataset(write_dataset(ds, tmp_path / "out"))
    assert back.user_ids == ds.user_ids
    assert [s.tolist() for s in back.sequences] == [s.tolist() for s in ds.sequences]
    assert back.items["text"].tolist() == ds.items["text"].tolist()


def test_amazon_raw_errors(tmp_path):
    rpath, mpath = write_raw(tmp_path, [{"reviewerID": "u1", "asin": "a"}], ['{"asin": "a"}'], gz=False)
    with pytest.raises(DataError, match=r"reviews\.json:1: needs reviewerID, asin and an integer unixReviewTime"):
        load_amazon_raw(rpath, mpath)
    mpath.write_text('{"asin": "a"}\n{oops\n')
    rpath.write_text(json.dumps(review("u1", "a", 1)) + "\n")
    with pytest.raises(DataError, match=r"meta\.json:2: malformed line"):
        load_amazon_raw(rpath, mpath)
    mpath.write_text('{"asin": "a"}\n')
    with pytest.raises(DataError, match="nothing left after 5-core filtering"):
        load_amazon_raw(rpath, mpath)
    with pytest.raises(DataError, match="file not found"):
        load_amazon_raw(tmp_path / "missing.json", mpath)


def test_import_amazon_command_writes_a_preparable_dataset(tmp_path, capsys):
    from nezha.cli import main

    reviews = [review(u, i, t) for t, (u, i) in enumerate([("u1", "a"), ("u1", "b"), ("u2", "b"), ("u2", "a")])]
    meta = [json.dumps({"asin": "a", "title": "Lipstick"}), json.dumps({"asin": "b", "title": "Cream"})]
    rpath, mpath = write_raw(tmp_path, reviews, meta)
    out = tmp_path / "beauty-raw"
    assert main(["import-amazon", "--reviews", str(rpath), "--meta", str(mpath), "--out", str(out), "--k-core", "2"]) == 0
    assert "2 items, 2 users, 4 interactions" in capsys.readouterr().out
    assert [s.tolist() for s in load_dataset(out).sequences] == [[0, 1], [1, 0]]
    # missing flags and unreadable input: exit 2 with a one-line reason, no traceback
    assert main(["import-amazon", "--out", str(out)]) == 2
    assert "pass --reviews and --meta" in capsys.readouterr().err
    assert main(["import-amazon", "--reviews", str(tmp_path / "nope.json"), "--meta", str(mpath), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err


# ---- leave-one-out ----------------------------------------------------------------------------------


def as_lists(examples):
    return [h.tolist() for h in examples.histories], examples.targets.tolist()


def test_leave_one_out_exact():
    seqs = [np.array([0, 1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9])]
    split = leave_one_out(seqs, max_history=2)
    assert split.skipped_users == 1
    assert as_lists(split.train) == ([[0], [0, 1]], [1, 2])
    assert as_lists(split.valid) == ([[1, 2], [7]], [3, 8])
    assert as_lists(split.test) == ([[2, 3], [7, 8]], [4, 9])
    assert split.sizes() == {"train": 2, "valid": 2, "test": 2}

    full = leave_one_out(seqs, max_history=20)
    assert as_lists(full.test) == ([[0, 1, 2, 3], [7, 8]], [4, 9])
    with pytest.raises(ValueError, match="max_history"):
        leave_one_out(seqs, max_history=0)


def test_split_and_sequences_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 100, size=n) for n in rng.integers(1, 30, size=50)]
    split = leave_one_out(seqs, max_history=5)
    split.save(tmp_path / "split.npz")
    back = Split.load(tmp_path / "split.npz")  # loads with allow_pickle=False
    assert back.skipped_users == split.skipped_users
    for name in ("train", "valid", "test"):
        assert as_lists(getattr(back, name)) == as_lists(getattr(split, name))
        assert getattr(back, name).targets.dtype == np.int64

    save_sequences(tmp_path / "seq.npz", seqs, [f"user{i}" for i in range(50)])
    back_seqs, users = load_sequences(tmp_path / "seq.npz")
    assert [s.tolist() for s in back_seqs] == [s.tolist() for s in seqs]
    assert users == [f"user{i}" for i in range(50)]


def test_examples_subset_is_seeded_ordered_and_capped():
    from nezha.data.split import Examples

    examples = Examples([np.array([i]) for i in range(50)], np.arange(50))
    a, b = examples.subset(10, seed=3), examples.subset(10, seed=3)
    assert a.targets.tolist() == b.targets.tolist() == sorted(a.targets.tolist())
    assert len(a) == 10 and len(set(a.targets.tolist())) == 10
    assert [h[0] for h in a.histories] == a.targets.tolist()  # histories stay paired with their targets
    assert examples.subset(10, seed=4).targets.tolist() != a.targets.tolist()
    assert examples.subset(0) is examples and examples.subset(500) is examples


# ---- inputs at scale: formats, parts, bad input ------------------------------------------------------

ROWS = [("u1", "b", 1), ("u1", "a", 0), ("u2", "c", 0), ("u1", "c", 2), ("u2", "a", 1), ("u3", "zz", 0)]


def write_parts(path, fmt, rows=ROWS, parts=2, column="position"):
    """`rows` as a directory interactions/ of `parts` files in `fmt`, plus the toy items.jsonl."""
    write_dir(path, interactions="user_id,item_id,position\n")
    (path / "interactions.csv").unlink()
    (path / "interactions").mkdir()
    for k in range(parts):
        table = pa.table({"user_id": [r[0] for r in rows[k::parts]], "item_id": [r[1] for r in rows[k::parts]],
                          column: pa.array([r[2] for r in rows[k::parts]], pa.int64())})
        target = path / "interactions" / f"part-{k}.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, target)
        elif fmt == "csv":
            pacsv.write_csv(table, target)
        else:
            target.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_directory_of_parts_in_any_format_loads_like_the_csv_file(tmp_path, fmt):
    csv = "user_id,item_id,position\n" + "".join(f"{u},{i},{p}\n" for u, i, p in ROWS)
    expected = load_dataset(write_dir(tmp_path / "one", interactions=csv))
    got = load_dataset(write_parts(tmp_path / fmt, fmt, parts=3))
    assert got.user_ids == expected.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in expected.sequences] == [[0, 1, 2], [2, 0]]
    assert got.stats["unknown_item_interactions"] == 1 and got.stats["parts"] == 3


def test_single_parquet_and_jsonl_files_and_parquet_items(tmp_path):
    path = tmp_path / "toy"
    path.mkdir()
    pq.write_table(pa.table({"item_id": ["a", "b"], "title": ["A", None],
                             "categories": pa.array([["x", "y"], []], pa.list_(pa.string()))}), path / "items.parquet")
    pq.write_table(pa.table({"user_id": [1, 1, 2], "item_id": ["b", "a", "a"], "timestamp": [20, 10, 5]}),
                   path / "interactions.parquet")
    ds = load_dataset(path)
    assert ds.user_ids == ["1", "2"] and [s.tolist() for s in ds.sequences] == [[0, 1], [0]]
    assert ds.items["text"].tolist() == ["A | Categories: x > y", "b"]
    (path / "interactions.parquet").unlink()
    (path / "interactions.jsonl").write_text('{"user_id": "u", "item_id": "a", "position": 0}\n')
    assert load_dataset(path).sequences[0].tolist() == [0]


def test_a_synthetic_log_groups_like_pandas(tmp_path):
    from nezha.synth import SynthConfig, synthesize

    synthesize(SynthConfig(out=str(tmp_path / "s"), items=200, interactions=5_000, part_rows=1_500, seed=4))
    ds = load_dataset(tmp_path / "s")
    frame = pq.read_table(sorted((tmp_path / "s" / "interactions").glob("*.parquet"))).to_pandas()
    users = list(dict.fromkeys(frame["user_id"]))  # order of first appearance
    index = {item: k for k, item in enumerate(ds.items["item_id"])}
    by_user = frame.sort_values("timestamp", kind="stable").groupby("user_id")["item_id"]
    assert ds.user_ids == users
    assert [s.tolist() for s in ds.sequences] == [[index[i] for i in by_user.get_group(u)] for u in users]


def test_k_core_removes_users_and_items_below_k_repeatedly(tmp_path):
    # k=2: item c has one interaction; removing it leaves u2 with one, removing u2 leaves item d with one
    rows = "user_id,item_id,position\nu1,a,0\nu1,b,1\nu3,a,0\nu3,b,1\nu2,c,0\nu2,d,1\nu4,d,0\nu4,a,1\n"
    items = [{"item_id": i, "title": i} for i in "abcd"]
    ds = load_dataset(write_dir(tmp_path / "toy", items=items, interactions=rows), k_core_min=2)
    assert ds.user_ids == ["u1", "u3"] and [s.tolist() for s in ds.sequences] == [[0, 1], [0, 1]]
    assert ds.stats["k_core_removed_interactions"] == 4 and ds.num_items == 4  # items stay in the catalog
    with pytest.raises(DataError, match="nothing left after 3-core filtering"):
        load_dataset(tmp_path / "toy", k_core_min=3)


def test_empty_parts_are_skipped_and_counted(tmp_path, caplog):
    path = write_parts(tmp_path / "toy", "parquet", parts=2)
    (path / "interactions" / "part-2.parquet").write_bytes(b"")  # a writer that died
    pq.write_table(pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
                             "position": pa.array([], pa.int64())}), path / "interactions" / "part-3.parquet")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path)
    assert ds.stats["empty_parts"] == 2 and ds.stats["parts"] == 4 and ds.stats["num_interactions"] == 5
    assert "part-2.parquet: empty file, skipped" in caplog.text and "part-3.parquet: no rows, skipped" in caplog.text


def test_malformed_csv_lines_are_skipped_and_counted_up_to_a_share(tmp_path, caplog):
    good = "".join(f"u{k},a,{k}\n" for k in range(200))
    path = write_dir(tmp_path / "toy", interactions="user_id,item_id,position\n" + good + "u1,a\nu2,b,1,extra\n")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path)
    assert ds.stats["malformed_rows_skipped"] == 2 and ds.stats["num_interactions"] == 200
    assert "interactions.csv:202: skipping a malformed line (2 fields, expected 3)" in caplog.text
    bad = "user_id,item_id,position\n" + "u1;a;0\n" * 30
    with pytest.raises(DataError, match=r"interactions\.csv: 30 of 30 lines are malformed .*check the delimiter"):
        load_dataset(write_dir(tmp_path / "semi", interactions=bad))


@pytest.mark.parametrize(("table", "message"), [
    ({"user_id": ["u"], "item_id": ["a"]}, r"part-0\.parquet: missing column\(s\) \['position or timestamp'\]"),
    ({"user_id": [True], "item_id": ["a"], "position": [0]}, r"column 'user_id' has type bool; ids are strings"),
    ({"user_id": ["u"], "item_id": ["a"], "position": [[0]]}, r"column 'position' has type list<element: int64>"),
    ({"user_id": ["u", None], "item_id": ["a", "b"], "position": [0, 1]}, r"part-0\.parquet, row 2: empty user_id"),
    ({"user_id": ["u", "u"], "item_id": ["a", "b"], "position": [0.0, 1.5]}, r"row 2: position 1\.5 is not an integer"),
    ({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1_600_000_000, 1_600_000_000_000]},
     r"column 'timestamp' mixes units: from 1\.6e\+09 \(seconds\) to 1\.6e\+12 \(milliseconds\)"),
])
def test_bad_parts_are_refused_naming_file_column_and_row(tmp_path, table, message):
    path = write_parts(tmp_path / "toy", "parquet", parts=1)
    pq.write_table(pa.table(table), path / "interactions" / "part-0.parquet")
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_parts_must_agree_on_order_column_and_timestamp_unit(tmp_path):
    path = write_parts(tmp_path / "toy", "parquet", parts=1, column="timestamp")
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"], "timestamp": [1_600_000_000_000]}),
                   path / "interactions" / "part-1.parquet")
    with pytest.raises(DataError, match=r"part-1\.parquet: column 'timestamp' is in milliseconds .* but "
                                        r".*part-0\.parquet in seconds; convert every part to one unit"):
        load_dataset(path)
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"], "position": [0]}), path / "interactions" / "part-1.parquet")
    with pytest.raises(DataError, match=r"part-1\.parquet: orders rows by 'position' but the parts before by 'timestamp'"):
        load_dataset(path)
    # typed timestamps are exact whatever their unit
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["b", "a"],
                             "timestamp": pa.array([2_000, 1_000], pa.timestamp("ms"))}), path / "interactions" / "part-0.parquet")
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["c"], "timestamp": pa.array([3], pa.timestamp("s"))}),
                   path / "interactions" / "part-1.parquet")
    assert load_dataset(path).sequences[0].tolist() == [0, 1, 2]


def test_a_parts_directory_must_hold_parts_of_one_format(tmp_path):
    path = write_parts(tmp_path / "toy", "parquet", parts=1)
    (path / "interactions" / "_SUCCESS").write_text("")  # Spark's marker is not a part
    assert load_dataset(path).num_users == 2
    (path / "interactions" / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"'notes\.txt' is not a part file"):
        load_dataset(path)
    (path / "interactions" / "notes.txt").unlink()
    (path / "interactions" / "part-1.csv").write_text("user_id,item_id,position\nu,a,0\n")
    with pytest.raises(DataError, match=r"parts of several formats \(csv, parquet\); use one"):
        load_dataset(path)
    (path / "interactions" / "part-0.parquet").write_text("not parquet")
    (path / "interactions" / "part-1.csv").unlink()
    with pytest.raises(DataError, match=r"part-0\.parquet: cannot read as parquet"):
        load_dataset(path)
    (path / "interactions.csv").write_text("user_id,item_id,position\n")
    with pytest.raises(DataError, match=r"both interactions\.csv and interactions exist"):
        load_dataset(path)


# ---- the offset split ---------------------------------------------------------------------------------


def test_ragged_slices_are_views_of_one_array():
    from nezha.data.split import Ragged

    r = Ragged.pack([np.array([1, 2]), np.array([3]), np.array([4, 5, 6])])
    assert [h.tolist() for h in r[::2]] == [[1, 2], [4, 5, 6]] and r[1:][0].tolist() == [3]
    assert [h.tolist() for h in r[np.array([2, 0])]] == [[4, 5, 6], [1, 2]]
    assert r[2].base is r.values or np.shares_memory(r[2], r.values)
    assert r.lengths().tolist() == [2, 1, 3]


def test_split_is_offsets_into_the_sequences_and_old_files_still_load(tmp_path):
    seqs = [np.array([0, 1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9])]
    split = leave_one_out(seqs, max_history=2)
    assert split.train.histories.values is split.test.histories.values  # one array for every part
    split.save(tmp_path / "split.npz")
    with np.load(tmp_path / "split.npz") as data:
        assert data["values"].tolist() == list(range(10)) and data["test_ends"].tolist() == [4, 9]
    # nezha-prepared/1 stored every history as its own run of values
    old = {"skipped_users": np.int64(1)}
    for name in ("train", "valid", "test"):
        part = getattr(split, name)
        values, offsets = pack_ragged(list(part.histories))
        old |= {f"{name}_history_values": values, f"{name}_history_offsets": offsets, f"{name}_targets": part.targets}
    np.savez(tmp_path / "old.npz", **old)
    back = Split.load(tmp_path / "old.npz")
    for name in ("train", "valid", "test"):
        assert as_lists(getattr(back, name)) == as_lists(getattr(split, name))
    np.savez(tmp_path / "old-seq.npz", values=np.arange(3), offsets=np.array([0, 1, 3]), user_ids=np.array(["x", "yy"]))
    seqs_back, users = load_sequences(tmp_path / "old-seq.npz")
    assert users == ["x", "yy"] and [s.tolist() for s in seqs_back] == [[0], [1, 2]]


def test_item_table_is_cleaned_column_wise_like_the_scalar_rules():
    from nezha.data.datasets import _clean, category_list, item_text, items_frame

    raw = pd.DataFrame({
        "item_id": ["a", "b", "c", "d", "e"],
        "title": ["  Rose\xa0Oil\t 30\u3000ml\x85 ", 42, None, "", float("nan")],
        "brand": ["Acme\u2009Co", None, " ", "B", None],
        "categories": [["Beauty", "  ", "Skin\nCare"], "Makeup", None, [], ["\x1c"]],
    })
    items, stats = items_frame(raw, "test")
    for row, (_, r) in zip(items.itertuples(index=False), raw.iterrows(), strict=True):
        title, brand, cats = _clean(r["title"]), _clean(r["brand"]), category_list(r["categories"])
        assert (row.title, row.brand, list(row.categories)) == (title, brand, cats)
        assert row.text == item_text(r["item_id"], title, brand, cats)
    assert items["text"].tolist()[0] == "Rose Oil 30 ml | Brand: Acme Co | Categories: Beauty > Skin Care"
    assert stats == {"items_missing_title": 3, "items_without_text": 2}
