import copy
import gc
import types
import weakref

import numpy as np
import pytest
import torch

from nezha.decoding import decode, draft_beam_search, prompt_for
from nezha.decoding.graphs import DraftGraphs, GraphedDraftSearch
from nezha.model.checkpoint import create_model
from nezha.model.draft_head import DraftHead
from nezha.model.model import ModelConfig
from nezha.verify import PrefixVerifier, pack, unpack

SIZES = [5, 4, 3]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 3, (25, 3)) + [0, 1, 0], axis=0)  # a sparse catalog
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES)
    model = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=["joint", "mtp"])).eval()
    histories = [codes[rng.integers(0, len(codes), n)] for n in (1, 3, 6)]
    return model, verifier, histories, codes


@pytest.mark.parametrize("decoder", ["nezha", "mtp", "beam", "hf-beam-constrained"])
def test_decoders_return_only_valid_sorted_ids(setup, decoder):
    model, verifier, histories, _ = setup
    result = decode(model, decoder, histories, verifier, beam=6)
    assert result.ids.shape == result.scores.shape == (3, 6)
    assert result.invalid.tolist() == [0, 0, 0]
    assert verifier.contains(result.ids).all()
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    for row in result.ids.tolist():
        assert len(set(row)) == len(row)


def test_our_beam_search_equals_constrained_hf_generate(setup):
    model, verifier, histories, _ = setup
    ours = decode(model, "beam", histories, verifier, beam=6)
    hf = decode(model, "hf-beam-constrained", histories, verifier, beam=6)
    assert torch.equal(ours.ids, hf.ids)
    assert torch.allclose(ours.scores, hf.scores, atol=1e-4)


def test_unverified_modes_count_and_drop_invalid_ids(setup):
    model, verifier, histories, _ = setup
    free = decode(model, "nezha", histories, verifier, beam=8, verify="none")
    end = decode(model, "nezha", histories, verifier, beam=8, verify="end")
    assert torch.equal(free.invalid, end.invalid)
    assert free.invalid.sum() > 0  # random weights wander off the sparse catalog
    valid_end = end.ids[end.ids >= 0]
    assert verifier.contains(valid_end).all()
    assert ((end.ids >= 0).sum(1) == 8 - end.invalid).all()
    with pytest.raises(ValueError, match="verify mode"):
        decode(model, "nezha", histories, verifier, beam=4, verify="sometimes")


def test_unknown_or_missing_decoder_is_a_clear_error(setup):
    model, verifier, histories, _ = setup
    with pytest.raises(ValueError, match="unknown decoder"):
        decode(model, "greedy", histories, verifier, beam=4)
    nezha_only = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES))
    with pytest.raises(ValueError, match="serves nezha"):
        decode(nezha_only, "beam", histories, verifier, beam=4)


@pytest.mark.parametrize("transition", ["rnn", "gru", "lstm", "mlp", "add", "none"])
def test_exhaustive_draft_beam_equals_brute_force_ranking(transition, setup):
    _, _, _, codes = setup
    torch.manual_seed(1)
    head = DraftHead(16, SIZES, transition).eval()
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES)
    h0, ctx = torch.randn(2, 16), torch.randn(2, 3, 16)
    full = int(np.prod(SIZES))
    with torch.no_grad():
        result = draft_beam_search(head, h0, ctx, verifier, beam=full, topk=len(codes))
        # brute force: teacher-forced log-prob of every valid item
        targets = torch.from_numpy(codes)
        scores = []
        for b in range(2):
            logits = head.teacher_forced_logits(h0[b : b + 1].expand(len(codes), -1),
                                                ctx[b : b + 1].expand(len(codes), -1, -1), targets)
            scores.append(sum(torch.log_softmax(lg, -1).gather(1, targets[:, i : i + 1]).squeeze(1)
                              for i, lg in enumerate(logits)))
    for b in range(2):
        order = torch.argsort(scores[b], descending=True)
        expected_ids = torch.from_numpy(pack(codes, SIZES))[order]
        assert torch.allclose(result.scores[b], scores[b][order], atol=1e-5)
        assert torch.equal(result.ids[b], expected_ids)


def test_beam_wider_than_catalog_pads_with_minus_one(setup):
    model, verifier, histories, codes = setup
    result = decode(model, "nezha", histories, verifier, beam=200)
    alive = result.ids >= 0
    assert (alive.sum(1) == len(codes)).all()
    assert torch.isinf(result.scores[~alive]).all()
    decoded = {tuple(r) for r in unpack(result.ids[0][alive[0]].numpy(), SIZES).tolist()}
    assert decoded == {tuple(r) for r in codes.tolist()}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("decoder", ["nezha", "mtp", "beam", "hf-beam", "hf-beam-constrained"])
def test_decoders_on_the_gpu_agree_with_the_cpu(setup, decoder):
    model, verifier, histories, codes = setup
    gpu_model = copy.deepcopy(model).cuda()
    gpu_verifier = PrefixVerifier(pack(codes, SIZES), SIZES, device="cuda")
    cpu = decode(model, decoder, histories, verifier, beam=6)
    gpu = decode(gpu_model, decoder, histories, gpu_verifier, beam=6)
    assert gpu.ids.device.type == "cuda"
    assert torch.allclose(cpu.scores, gpu.scores.cpu(), atol=1e-4)  # ties may swap order, scores may not
    if decoder != "hf-beam":
        assert gpu_verifier.contains(gpu.ids).all()


@needs_cuda
def test_graphed_head_search_matches_eager_and_follows_catalog_changes(setup):
    model, _, histories, codes = setup
    gpu_model = copy.deepcopy(model).cuda()
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES, device="cuda")
    graphed = GraphedDraftSearch(gpu_model.draft_head, verifier, beam=6)
    with torch.inference_mode():
        for shift in range(3):  # new inputs replay the same graph
            ids, mask = prompt_for(gpu_model, "nezha", histories[shift:] + histories[:shift], "cuda")
            h0, contexts = gpu_model.draft_inputs(ids, mask)
            eager = draft_beam_search(gpu_model.draft_head, h0, contexts, verifier, beam=6)
            replayed = graphed(h0, contexts)
            assert torch.equal(eager.ids, replayed.ids) and torch.equal(eager.scores, replayed.scores)
        removed = int(eager.ids[0, 0])
        verifier.update(remove=[removed])  # new tables: the graph must be captured again
        eager = draft_beam_search(gpu_model.draft_head, h0, contexts, verifier, beam=6)
        replayed = graphed(h0, contexts)
        assert torch.equal(eager.ids, replayed.ids) and removed not in replayed.ids.tolist()[0]


def test_graphs_are_ignored_off_the_gpu(setup):
    model, verifier, histories, _ = setup
    graphs = DraftGraphs()
    eager = decode(model, "nezha", histories, verifier, beam=6)
    same = decode(model, "nezha", histories, verifier, beam=6, graphs=graphs)
    assert torch.equal(eager.ids, same.ids) and len(graphs) == 0


def test_graph_cache_holds_one_graph_per_bucket_however_often_the_catalog_changes(setup, monkeypatch):
    """Every decode brings a new catalog snapshot; the cache must not keep a graph (and its device tables) per
    snapshot. CUDA graphs cannot be captured here, so capture and replay run the eager search (GPU-only part)."""
    model, _, histories, codes = setup
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES)

    def eager_capture(self, h0, contexts):
        self._h0, self._contexts = h0.clone(), None if contexts is None else contexts.clone()
        self._graph = types.SimpleNamespace(replay=lambda: setattr(self, "_out", self._search()))

    monkeypatch.setattr(GraphedDraftSearch, "_capture", eager_capture)
    graphs = DraftGraphs()
    ids, mask = prompt_for(model, "nezha", histories, "cpu")
    with torch.inference_mode():
        h0, contexts = model.draft_inputs(ids, mask)
    free = [int(v) for v in np.setdiff1d(np.arange(int(np.prod(SIZES))), pack(codes, SIZES))]
    released = []
    for change in range(200):
        verifier.update(add=[free[change % len(free)]]) if change % 2 == 0 else \
            verifier.update(remove=[free[(change - 1) % len(free)]])
        snapshot = verifier.snapshot()
        with torch.inference_mode():
            out = graphs.search(model.draft_head, h0, contexts, snapshot, beam=6)
            eager = draft_beam_search(model.draft_head, h0, contexts, snapshot, beam=6)
        assert torch.equal(out.ids, eager.ids[:len(histories)])  # answers from this snapshot's catalog
        released.append(weakref.ref(snapshot.tables))
        del snapshot
    gc.collect()
    assert len(graphs) == 1  # one bucket (3 users padded to 4)
    assert sum(ref() is not None for ref in released) <= 1  # only the last snapshot's tables stay alive


@needs_cuda
def test_decode_with_graphs_matches_eager_for_any_batch_size(setup):
    model, _, histories, codes = setup
    gpu_model = copy.deepcopy(model).cuda()
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES, device="cuda")
    graphs = DraftGraphs()
    for rows in (histories, histories[:2], histories[:1], histories):  # batches of 3, 2, 1 and 3 again
        eager = decode(gpu_model, "nezha", rows, verifier, beam=6)
        graphed = decode(gpu_model, "nezha", rows, verifier, beam=6, topk=6, graphs=graphs)
        assert torch.equal(eager.ids, graphed.ids) and torch.equal(eager.invalid, graphed.invalid)
        assert torch.allclose(eager.scores, graphed.scores, atol=1e-5)
    assert len(graphs) == 3  # padded to batch buckets 4, 2 and 1; the second batch of 3 replays bucket 4
