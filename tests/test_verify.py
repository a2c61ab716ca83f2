import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nezha.verify import PrefixVerifier, pack, prefix_of, radix_weights, unpack

sizes_strategy = st.lists(st.integers(1, 600), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_strategy, data=st.data())
def test_pack_unpack_round_trip_numpy_and_torch(sizes, data):
    n = data.draw(st.integers(0, 20))
    codes = np.array([[data.draw(st.integers(0, s - 1)) for s in sizes] for _ in range(n)], dtype=np.int64).reshape(n, len(sizes))
    values = pack(codes, sizes)
    assert np.array_equal(unpack(values, sizes), codes)
    t = torch.from_numpy(codes)
    assert torch.equal(pack(t, sizes), torch.from_numpy(values))
    assert torch.equal(unpack(pack(t, sizes), sizes), t)
    # distinct codes map to distinct values (a bijection onto 0..prod-1)
    assert len(set(values.tolist())) == len({tuple(r) for r in codes.tolist()})


def test_pack_matches_the_mixed_radix_formula_and_prefixes():
    sizes = [512, 512, 512]
    codes = np.array([[3, 7, 11]])
    assert pack(codes, sizes)[0] == 3 + 512 * 7 + 512 * 512 * 11
    assert prefix_of(pack(codes, sizes), 2, sizes)[0] == 3 + 512 * 7
    assert radix_weights([4, 5]) == [1, 4, 20]


def test_codec_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack(np.array([[4, 0]]), [4, 4])
    with pytest.raises(ValueError, match="levels"):
        pack(np.array([[1, 2, 3]]), [4, 4])
    with pytest.raises(ValueError, match="out of range"):
        unpack(np.array([16]), [4, 4])
    with pytest.raises(ValueError, match="int64"):
        radix_weights([2**22] * 3)


@pytest.mark.parametrize("dense_limit", [1 << 24, 1])  # dense tables and sorted+searchsorted
def test_verifier_prefix_semantics(dense_limit):
    sizes = [4, 5, 6]
    items = np.array([[0, 1, 2], [0, 1, 3], [3, 4, 5]])
    verifier = PrefixVerifier(pack(items, sizes), sizes, dense_limit=dense_limit)
    all_codes = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, 3)
    values = torch.from_numpy(pack(all_codes, sizes))
    for length in (1, 2, 3):
        expected = {tuple(r[:length]) for r in items.tolist()}
        got = verifier.contains(prefix_of(values, length, sizes), length)
        want = torch.tensor([tuple(r[:length]) in expected for r in all_codes.tolist()])
        assert torch.equal(got, want), length
    assert not verifier.contains(torch.tensor([-1, 10**6]), 3).any()
    # child_mask: which level-1 codes extend prefix (0,)
    mask = verifier.child_mask(torch.tensor([0]), 1)
    assert mask.tolist() == [[False, True, False, False, False]]
    assert pack(items, sizes)[0] in verifier and len(verifier) == 3


def test_child_mask_row_tables_agree_with_prefix_lookups():
    """The dense children rows (fast path) give exactly what K*T prefix lookups give, padding included."""
    sizes = [4, 5, 6]
    rng = np.random.default_rng(0)
    items = np.stack([rng.integers(0, s, 40) for s in sizes], -1)
    fast = PrefixVerifier(pack(items, sizes), sizes)
    slow = PrefixVerifier(pack(items, sizes), sizes, dense_limit=1)  # no dense tables, so no children rows
    assert all(rows is not None for rows in fast._tables.children)
    assert all(rows is None for rows in slow._tables.children)
    for length in range(3):
        space = fast.weights[length]
        prefixes = torch.cat([torch.arange(space), torch.tensor([-1, space])]).unsqueeze(0)  # [B=1, K] with padding
        got = fast.child_mask(prefixes, length)
        assert got.shape == (*prefixes.shape, sizes[length])
        assert torch.equal(got, slow.child_mask(prefixes, length)), length
        assert not got[prefixes < 0].any() and not got[prefixes >= space].any()


def test_verifier_add_remove_and_replace():
    sizes = [4, 4]
    verifier = PrefixVerifier([], sizes)
    assert not verifier.contains(torch.arange(16)).any()
    verifier.update(add=[5, 6])
    assert verifier.contains(torch.tensor([5, 6, 7])).tolist() == [True, True, False]
    assert verifier.contains(torch.tensor([1, 2]), 1).tolist() == [True, True]
    verifier.update(remove=[5])
    assert verifier.contains(torch.tensor([5, 6])).tolist() == [False, True]
    assert verifier.contains(torch.tensor([1]), 1).tolist() == [False]
    verifier.replace([0])
    assert verifier.ids == frozenset({0})
    with pytest.raises(ValueError, match="outside"):
        verifier.update(add=[16])
    with pytest.raises(ValueError, match="prefix length"):
        verifier.contains(torch.tensor([0]), 3)
