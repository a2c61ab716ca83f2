"""The fixed on-disk catalog (nezha/catalog.py): lookups, save/load, validation."""

import json

import numpy as np
import pytest

from nezha.catalog import Catalog, CatalogError, ItemCodes, UnknownItemError


def small_catalog():
    codes = np.array([[0, 1], [2, 0], [1, 1]])
    return Catalog(item_ids=["x", "y", "z"], codes=codes, codebook_sizes=(3, 2), titles=["X", "Y", "Z"])


def test_catalog_lookups():
    cat = small_catalog()
    assert cat.num_items == 3 and cat.levels == 2
    np.testing.assert_array_equal(cat.packed, [3, 2, 4])  # t0 + 3 * t1
    assert cat.index_of("z") == 2
    np.testing.assert_array_equal(cat.indices_of(["z", "x"]), [2, 0])
    assert cat.item_of_packed(np.array([4, 0, 2, 3, 99])) == ["z", None, "y", "x", None]
    with pytest.raises(UnknownItemError, match="item 'nope' is not in the catalog"):
        cat.index_of("nope")
    with pytest.raises(KeyError):
        cat.indices_of(["x", "nope"])


def test_catalog_save_load_and_validation(tmp_path):
    cat = small_catalog()
    cat.save(tmp_path / "cat")
    back = Catalog.load(tmp_path / "cat")
    assert back.item_ids == cat.item_ids and back.titles == cat.titles and back.codebook_sizes == (3, 2)
    np.testing.assert_array_equal(back.codes, cat.codes)

    meta = json.loads((tmp_path / "cat" / "catalog.json").read_text())
    meta["item_ids"] = ["x", "y", "x"]
    (tmp_path / "cat" / "catalog.json").write_text(json.dumps(meta))
    with pytest.raises(CatalogError, match=r"1 duplicate item id\(s\), e\.g\. \['x'\]"):
        Catalog.load(tmp_path / "cat")

    with pytest.raises(CatalogError, match=r"item 'y' has codes \[3, 0\] outside codebook sizes \[3, 2\]"):
        Catalog(["x", "y"], np.array([[0, 1], [3, 0]]), (3, 2), ["", ""])
    with pytest.raises(CatalogError, match="shared by several items"):
        Catalog(["x", "y"], np.array([[0, 1], [0, 1]]), (3, 2), ["", ""])
    with pytest.raises(CatalogError, match="not a catalog directory"):
        Catalog.load(tmp_path / "nothing")


def test_item_codes_load_without_the_ids_and_titles(tmp_path):
    cat = small_catalog()
    cat.save(tmp_path / "cat")
    (tmp_path / "cat" / "catalog.json").unlink()  # what training reads must not need it
    codes = ItemCodes.load(tmp_path / "cat")
    assert type(codes) is ItemCodes and codes.codebook_sizes == (3, 2) and codes.num_items == 3 and codes.levels == 2
    np.testing.assert_array_equal(codes.codes, cat.codes)
    np.testing.assert_array_equal(codes.packed, cat.packed)
    assert len(codes.verifier()) == len(cat.verifier()) == 3 and 4 in codes.verifier()


def test_item_codes_of_a_catalog_saved_before_codes_json(tmp_path):
    small_catalog().save(tmp_path / "cat")
    (tmp_path / "cat" / "codes.json").unlink()  # the sizes are then read from catalog.json
    codes = ItemCodes.load(tmp_path / "cat")
    assert codes.codebook_sizes == (3, 2)
    np.testing.assert_array_equal(codes.packed, [3, 2, 4])


def test_item_codes_refuse_what_a_catalog_refuses(tmp_path):
    with pytest.raises(CatalogError, match=r"item row 1 has codes \[3, 0\] outside codebook sizes \[3, 2\]"):
        ItemCodes(np.array([[0, 1], [3, 0]]), (3, 2))
    with pytest.raises(CatalogError, match=r"shared by several items, e\.g\. \['row 0', 'row 1'\]"):
        ItemCodes(np.array([[0, 1], [0, 1]]), (3, 2))
    with pytest.raises(CatalogError, match=r"at least one item"):
        ItemCodes(np.zeros((0, 2), dtype=np.int64), (3, 2))
    small_catalog().save(tmp_path / "cat")
    (tmp_path / "cat" / "codes.json").write_text('{"format": "other/9"}')
    with pytest.raises(CatalogError, match="codes.json: unsupported format 'other/9'"):
        ItemCodes.load(tmp_path / "cat")
    (tmp_path / "cat" / "codes.npy").unlink()
    (tmp_path / "cat" / "codes.json").write_text('{"format": "nezha-catalog/1", "codebook_sizes": [3, 2]}')
    with pytest.raises(CatalogError, match="not a catalog directory"):
        ItemCodes.load(tmp_path / "cat")
