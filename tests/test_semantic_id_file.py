"""Bring-your-own semantic IDs: reading TIGER / LETTER / LC-Rec style ID files and the collision rule."""

import json

import numpy as np
import pytest

from nezha.data.datasets import DataError
from nezha.semantic_ids.id_file import make_unique, read_semantic_ids
from nezha.verify.codec import pack


def write(tmp_path, data, name="ids.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_token_and_integer_files_read_alike(tmp_path):
    tokens = {"x": ["<a_12>", "<b_3>", "<c_40>", "<d_7>"], "y": ["<a_0>", "<b_5>", "<c_1>", "<d_0>"]}
    ints = {"x": [12, 3, 40, 7], "y": [0, 5, 1, 0]}
    for data in (tokens, ints):
        item_ids, codes, sizes = read_semantic_ids(write(tmp_path, data))
        assert item_ids == ["x", "y"]  # file order
        assert codes.dtype == np.int64 and codes.tolist() == [[12, 3, 40, 7], [0, 5, 1, 0]]
        assert sizes == (13, 6, 41, 8)  # inferred: largest code + 1 per level


def test_given_codebook_sizes(tmp_path):
    path = write(tmp_path, {"x": [12, 3], "y": [0, 5]})
    assert read_semantic_ids(path, [256, 256])[2] == (256, 256)
    with pytest.raises(DataError, match=r"item 'y': code 5 at level 1 is outside its codebook \(size 4\); 1 item"):
        read_semantic_ids(path, [256, 4])
    with pytest.raises(DataError, match=r"has 2 levels but codebook_sizes gives 3"):
        read_semantic_ids(path, [256, 256, 256])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": [1, 2, 3], "y": [1, 2]}, r"item 'y' has 2 levels but item 'x' has 3; every item needs the same"),
        ({"x": ["<b_3>", "<a_1>"]}, r"item 'x': token '<b_3>' is at level 0, which takes <a_N>"),
        ({"x": ["<a_1>", "b_3"]}, r"item 'x': token 'b_3' at level 1 does not parse; expected <letter_number> such as <b_12>"),
        ({"x": ["<a_1>", "<b_x>"]}, r"token '<b_x>' at level 1 does not parse"),
        ({"x": "<a_1><b_2>"}, r"item 'x': expected a non-empty list of codes, got '<a_1><b_2>'"),
        ({"x": []}, r"item 'x': expected a non-empty list of codes"),
        ({"x": [1, -2]}, r"item 'x': negative code -2 at level 1"),
        ({"x": [1, True]}, r"item 'x': code True at level 1 is neither an integer nor a token"),
        ({"x": [1, 2.0]}, r"item 'x': code 2.0 at level 1 is neither"),
        ({"x": [2**62, 2**62]}, r"codebook sizes .* are too large"),
        ({"x": [2**64]}, r"a code does not fit an int64"),
        ([["<a_1>"]], r"expected a JSON object keyed by item, got a list"),
        ({}, r"empty object \(no items\)"),
        ("", r"empty file"),
        ('{"x": [1, 2],\n "x": [3, 4]}', r"item 'x' appears twice"),
        ('{"x": [1, 2]', r"ids\.json:1: malformed JSON"),
    ],
)
def test_bad_files_name_the_item_and_reason(tmp_path, data, message):
    with pytest.raises(DataError, match=message):
        read_semantic_ids(write(tmp_path, data))


def test_collisions_are_refused_with_the_groups_and_their_count(tmp_path):
    codes = np.array([[0, 0], [1, 1], [0, 0], [2, 0], [1, 1], [0, 0]] + [[3, k] for k in range(4)] * 2)
    item_ids = [f"i{k}" for k in range(len(codes))]
    with pytest.raises(DataError) as err:
        make_unique(item_ids, codes, (4, 4), "refuse", "ids.json")
    message = str(err.value)
    assert message.startswith("ids.json: 6 semantic ID(s) are shared by 13 items, e.g. [0, 0] <- ['i0', 'i2', 'i5']; ")
    assert "[1, 1] <- ['i1', 'i4']" in message and "--resolve-collisions append-level" in message
    assert message.count("<-") == 5  # the first five shared IDs, in file order; the count covers all


def test_append_level_numbers_items_within_each_shared_id_in_file_order():
    codes = np.array([[0, 0], [1, 1], [0, 0], [2, 0], [1, 1], [0, 0]])
    unique, sizes, stats = make_unique([f"i{k}" for k in range(6)], codes, (3, 2), "append-level", "ids.json")
    assert unique.tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 1], [2, 0, 0], [1, 1, 1], [0, 0, 2]]
    assert sizes == (3, 2, 3)  # the appended level is as large as the largest shared group
    assert len(np.unique(pack(unique, sizes))) == 6
    assert stats["raw_collisions"] == 3 and stats["raw_collision_rate"] == 0.5
    assert stats["shared_ids"] == 2 and stats["max_items_per_raw_id"] == 3
    assert stats["appended_level"] and stats["levels_in_file"] == 2 and stats["final_collision_rate"] == 0.0


def test_unique_ids_stay_as_they_are():
    codes = np.array([[0, 1], [1, 0]])
    for rule in ("refuse", "append-level"):
        unique, sizes, stats = make_unique(["a", "b"], codes, (2, 2), rule, "ids.json")
        assert unique.tolist() == codes.tolist() and sizes == (2, 2)
        assert not stats["appended_level"] and stats["raw_collisions"] == 0
        assert stats["codebook_usage"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown collision rule 'merge'"):
        make_unique(["a", "b"], codes, (2, 2), "merge", "ids.json")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "ids.json"
    path.write_bytes(b'{"x": ["<a_1>"], "\xff": [2]}')
    with pytest.raises(DataError, match="ids.json: not UTF-8 text"):
        read_semantic_ids(path)
