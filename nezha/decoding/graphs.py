"""The draft head's beam search replayed from a CUDA graph: one launch instead of dozens of small kernels.

On a GPU the head's L levels are ~20 tiny kernels each, so launch overhead, not arithmetic, sets its time.
The search has static shapes for a given (batch, beam) and no host synchronisation, so it can be captured
once and replayed. A captured graph reads the verifier tables it saw at capture time: `GraphedDraftSearch`
re-captures when it is called with other tables (a catalog change, or another snapshot's) and drops the old
graph, so a replica holds one graph, and one set of tables, per shape bucket however often the catalog changes.

A head that reads the prefill's history memory (transition "rnn-attn", whose memory length varies per batch)
is not graphed: `nezha_decode` and `score_candidates` run its search eagerly, and `DraftGraphs.search`
refuses it.
"""

from __future__ import annotations

import threading

import torch

from nezha.decoding.result import DecodeResult
from nezha.decoding.search import draft_beam_search
from nezha.model.draft_head import DraftHead
from nezha.verify.verifier import PrefixVerifier


class GraphedDraftSearch:
    """`draft_beam_search` for one input shape, captured in a CUDA graph on first call.

    Outputs live in the graph's static buffers and are overwritten by the next call: copy what you keep.
    """

    def __init__(self, head: DraftHead, verifier: PrefixVerifier, beam: int, topk: int | None = None,
                 verify: str = "prefix", warmup: int = 2) -> None:
        # `verifier` is the default; a call may pass another one (a later snapshot of the catalog).
        self.head, self.verifier, self.beam, self.topk, self.verify = head, verifier, beam, topk, verify
        self.warmup = warmup
        self._graph: torch.cuda.CUDAGraph | None = None
        self._shape: tuple[object, ...] | None = None
        self._tables: object = None  # the verifier tables the graph reads (kept alive, compared by identity)
        self._h0: torch.Tensor | None = None
        self._contexts: torch.Tensor | None = None
        self._out: DecodeResult | None = None

    def _search(self) -> DecodeResult:
        return draft_beam_search(self.head, self._h0, self._contexts, self.verifier, self.beam, self.topk,
                                 self.verify)

    def _capture(self, h0: torch.Tensor, contexts: torch.Tensor | None) -> None:
        self._h0 = h0.clone()
        self._contexts = None if contexts is None else contexts.clone()
        side = torch.cuda.Stream()  # warm-up off the default stream, as graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._search()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._search()

    def __call__(self, h0: torch.Tensor, contexts: torch.Tensor | None,
                 verifier: PrefixVerifier | None = None) -> DecodeResult:
        shape = (tuple(h0.shape), h0.dtype, None if contexts is None else tuple(contexts.shape))
        verifier = self.verifier if verifier is None else verifier
        tables = verifier.tables  # a catalog change swaps in a new tables object
        if shape != self._shape or tables is not self._tables:
            # Drop the old graph first: it pins the old tables on the device.
            self._graph = self._out = None
            self._tables = None
            self.verifier = verifier
            self._capture(h0, contexts)
            self._shape, self._tables = shape, tables
        else:
            self._h0.copy_(h0)
            if contexts is not None:
                self._contexts.copy_(contexts)
        self._graph.replay()
        return self._out


class DraftGraphs:
    """CUDA-graph head searches for a serving replica, one per (batch bucket, beam, topk, verify).

    Batches are zero-padded up to the next power of two (rows of the search are independent), so a replica
    captures at most log2(max batch) + 1 graphs per beam width. The key leaves the verifier out: each decode
    brings the catalog snapshot of its moment, and a new one re-captures that bucket's graph in place (memory
    stays flat under any number of catalog changes). One lock: replays share static buffers.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple[object, ...], GraphedDraftSearch] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def search(self, head: DraftHead, h0: torch.Tensor, contexts: torch.Tensor | None, verifier: PrefixVerifier,
               beam: int, topk: int | None = None, verify: str = "prefix") -> DecodeResult:
        if head.needs_memory:
            raise ValueError(f"transition {head.transition_kind} reads the history memory, which CUDA graphs do "
                             "not carry: use draft_beam_search (nezha_decode falls back to it)")
        batch = h0.shape[0]
        topk = beam if topk is None else topk
        bucket = 1 << (batch - 1).bit_length()
        if bucket > batch:
            h0 = torch.cat([h0, h0.new_zeros(bucket - batch, *h0.shape[1:])])
            if contexts is not None:
                contexts = torch.cat([contexts, contexts.new_zeros(bucket - batch, *contexts.shape[1:])])
        # The searches hold the head, so its id stays unique while it is part of a key here.
        key = (id(head), bucket, beam, topk, verify)
        with self._lock:
            graphed = self._graphs.get(key)
            if graphed is None:
                graphed = self._graphs[key] = GraphedDraftSearch(head, verifier, beam, topk, verify)
            out = graphed(h0, contexts, verifier)
            return DecodeResult(out.ids[:batch].clone(), out.scores[:batch].clone(), out.invalid[:batch].clone())
