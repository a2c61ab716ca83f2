"""The fixed on-disk catalog (nezha/catalog.py): lookups, save/load, validation."""

import json

import numpy as np
import pytest

from nezha.catalog import Catalog, CatalogError, UnknownItemError


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
