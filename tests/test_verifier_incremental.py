"""The incremental PrefixVerifier answers exactly like one built from scratch, whatever the change history,
and its snapshots keep answering the catalog of their moment."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nezha.verify import PrefixVerifier, radix_weights
from nezha.verify import verifier as verifier_module


def reference_contains(ids: set[int], weights: list[int], length: int, values: torch.Tensor) -> torch.Tensor:
    prefixes = {i % weights[length] for i in ids}
    return torch.tensor([v in prefixes for v in values.tolist()], dtype=torch.bool)


def assert_answers(verifier: PrefixVerifier, ids: set[int]) -> None:
    """contains() at every length and child_mask() at every depth, for every prefix and padding, against
    plain Python sets and against a verifier built from scratch from `ids`."""
    sizes, weights = verifier.sizes, verifier.weights
    scratch = PrefixVerifier(sorted(ids), sizes, dense_limit=verifier.dense_limit)
    for length in range(1, len(sizes) + 1):
        values = torch.arange(-1, weights[length] + 1)
        got = verifier.contains(values, length)
        assert torch.equal(got, reference_contains(ids, weights, length, values)), length
        assert torch.equal(got, scratch.contains(values, length)), length
    for length in range(len(sizes)):
        prefixes = torch.arange(-1, weights[length] + 1)
        codes = torch.arange(sizes[length])
        children = (prefixes.unsqueeze(-1) + codes * weights[length]).reshape(-1)
        want = reference_contains(ids, weights, length + 1, children).view(len(prefixes), sizes[length])
        want[(prefixes < 0) | (prefixes >= weights[length])] = False
        got = verifier.child_mask(prefixes, length)
        assert torch.equal(got, want), length
        assert torch.equal(got, scratch.child_mask(prefixes, length)), length
    assert len(verifier) == len(ids) and verifier.ids == ids and set(verifier.ids) == ids
    assert np.array_equal(verifier.ids.array, np.array(sorted(ids), dtype=np.int64))
    assert [p in verifier for p in range(-1, weights[-1] + 1)] == [p in ids for p in range(-1, weights[-1] + 1)]


@st.composite
def histories(draw: st.DrawFn) -> tuple:
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    weights = radix_weights(sizes)
    # 1: every length sparse; a middle weight: dense up to some length; 2**24: every length dense.
    dense_limit = draw(st.sampled_from([1, *weights[1:-1], 1 << 24]))
    ids = st.integers(0, weights[-1] - 1)
    anything = st.integers(-2, weights[-1] + 1)  # removing IDs outside the space is a no-op
    # A change may be followed by the live catalog's next view (a new snapshot replacing the last one),
    # as LocalCatalog does; the previous view's tables are then free again unless a decode still holds them.
    ops = st.one_of(
        st.tuples(st.just("update"), st.booleans(), st.lists(ids, max_size=8),
                  st.lists(st.one_of(ids, anything), max_size=8)),
        st.tuples(st.just("replace"), st.booleans(), st.lists(ids, max_size=40)),
        st.tuples(st.just("snapshot")),  # a decode holds the snapshot of this moment
        st.tuples(st.just("drop"), st.integers(0, 7)),  # a decode holding a snapshot finishes
    )
    return sizes, dense_limit, draw(st.lists(ids, max_size=40)), draw(st.lists(ops, max_size=14))


# The spare set replays changes, or is dropped and copied; the full-ID layers merge into a new base after
# every change, after a few, or (at these sizes) never.
@pytest.mark.parametrize(("replay_at_most", "layer_at"), [(1 << 20, 1 << 16), (0, 0), (1 << 20, 3)])
@settings(max_examples=200, deadline=None)
@given(history=histories())
def test_any_change_history_answers_like_a_verifier_built_from_scratch(history, replay_at_most, layer_at):
    sizes, dense_limit, initial, ops = history
    with mock.patch.object(verifier_module, "_REPLAY_AT_MOST", replay_at_most), \
            mock.patch.object(verifier_module, "_LAYER_AT", layer_at):
        _check_history(sizes, dense_limit, initial, ops)


def _check_history(sizes, dense_limit, initial, ops):
    verifier = PrefixVerifier(initial, sizes, dense_limit=dense_limit)
    current = set(initial)
    held: list[tuple[PrefixVerifier, set[int]]] = []
    view: list[tuple[PrefixVerifier, set[int]]] = []
    for op in ops:
        if op[0] == "update":
            verifier.update(add=op[2], remove=op[3])
            current = (current | set(op[2])) - set(op[3])  # removals win over adds of the same ID
        elif op[0] == "replace":
            verifier.replace(op[2])
            current = set(op[2])
        elif op[0] == "snapshot":
            held.append((verifier.snapshot(), set(current)))
        elif held:
            held.pop(op[1] % len(held))
        if op[0] in ("update", "replace") and op[1]:
            view = [(verifier.snapshot(), set(current))]
        assert_answers(verifier, current)
        for snapshot, catalog in held + view:
            assert_answers(snapshot, catalog)


@pytest.mark.parametrize("dense_limit", [1 << 24, 300])  # all dense; dense up to length 2 of 3
@pytest.mark.parametrize("sliced_edits", [0, 1 << 20])  # every splice by masks; every splice by slices
def test_large_batches_answer_like_a_verifier_built_from_scratch(dense_limit, sliced_edits):
    sizes = [16, 16, 16]
    rng = np.random.default_rng(1)
    with mock.patch.object(verifier_module, "_SLICED_EDITS", sliced_edits):
        verifier = PrefixVerifier(rng.choice(4096, 1500, replace=False), sizes, dense_limit=dense_limit)
        current = set(verifier.ids)
        pinned = verifier.snapshot()
        for _ in range(3):
            add, remove = rng.integers(0, 4096, 700), rng.integers(0, 4096, 700)
            verifier.update(add=add, remove=remove)
            current = (current | set(add.tolist())) - set(remove.tolist())
            assert_answers(verifier, current)
        assert pinned.ids.array.size == 1500 and pinned.version == 0 and verifier.version == 3


def test_a_change_copies_the_pending_layers_not_the_catalog():
    """Between merges a change leaves the base array of full IDs as it is (no O(items) copy); past _LAYER_AT
    pending IDs they merge into a new base, and the answers stay those of a verifier built from scratch."""
    rng = np.random.default_rng(2)
    sizes = [16, 16, 16]
    for dense_limit in (1 << 24, 300):  # the full IDs with a dense device table; with device layers
        with mock.patch.object(verifier_module, "_LAYER_AT", 40):
            verifier = PrefixVerifier(rng.choice(4096, 1500, replace=False), sizes, dense_limit=dense_limit)
            current, base, merges = set(verifier.ids), verifier._tables.ids.base, 0
            for step in range(30):
                add, remove = rng.integers(0, 4096, 3), rng.integers(0, 4096, 3)
                verifier.update(add=add, remove=remove)
                current = (current | set(add.tolist())) - set(remove.tolist())
                pending = verifier._tables.ids.added.size + verifier._tables.ids.removed.size
                if verifier._tables.ids.base is base:
                    assert pending <= 40, step
                else:  # merged: a new base holds every change so far
                    assert pending == 0 and np.array_equal(verifier._tables.ids.base, sorted(current)), step
                    base, merges = verifier._tables.ids.base, merges + 1
                assert_answers(verifier, current)
            assert merges >= 2  # 30 changes of up to 6 IDs against a layer cap of 40


def test_a_splice_of_a_tensor_matches_the_splice_of_the_array():
    """The device path for sparse tables (torch.cat of slices) edits exactly like the host path."""
    keys = np.array([2, 5, 7, 9, 12], dtype=np.int64)
    born, died = np.array([0, 6, 8, 13], dtype=np.int64), np.array([5, 9, 12], dtype=np.int64)
    splice = verifier_module._Splice(keys, born, died)
    want = [0, 2, 6, 7, 8, 13]
    assert splice.apply(keys, born).tolist() == want
    assert splice.apply(torch.from_numpy(keys), torch.from_numpy(born)).tolist() == want


def test_snapshots_are_read_only_and_no_op_updates_keep_the_tables():
    verifier = PrefixVerifier([1, 2], (4, 4))
    tables, version = verifier.tables, verifier.version
    verifier.update(add=[1], remove=[3, -1])  # 1 is there, 3 is not: nothing changes
    assert verifier.tables is tables and verifier.version == version
    verifier.update(add=[3])
    assert verifier.tables is not tables and verifier.version == version + 1
    with pytest.raises(RuntimeError, match="read-only"):
        verifier.snapshot().update(add=[4])
    with pytest.raises(ValueError, match="outside"):
        verifier.update(add=[16])


def _pointers(verifier: PrefixVerifier) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in verifier._tables.dense if t is not None)


def test_dense_tables_are_written_in_place_or_double_buffered_never_under_a_snapshot():
    """No snapshot: changes write the tables in place. The serving pattern (each version snapshotted, the
    previous snapshot dropped): two sets of tables, alternating. A snapshot still in flight: a copy."""
    sizes = (8, 8, 8)
    verifier = PrefixVerifier(range(0, 512, 3), sizes)
    first = _pointers(verifier)
    verifier.update(add=[1])
    assert _pointers(verifier) == first
    view = verifier.snapshot()
    seen = set()
    for p in range(2, 40, 3):
        verifier.update(remove=[p - 2], add=[p])
        view = verifier.snapshot()  # the catalog's new view replaces the old one
        seen.add(_pointers(verifier))
    assert len(seen) == 2
    in_flight = view  # a decode still holds this version while two more land
    verifier.update(add=[500])
    view = verifier.snapshot()
    verifier.update(add=[502])
    assert _pointers(verifier) not in seen and len(seen | {_pointers(view), _pointers(in_flight)}) == 2
    assert 500 not in in_flight and (500 in view and 502 not in view) and {500, 502} <= verifier.ids
