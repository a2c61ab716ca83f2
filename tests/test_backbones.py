"""nezha/model/backbones.py: the KV-cache keyword for the installed transformers."""

from __future__ import annotations

import torch

from nezha.model.backbones import build_backbone, with_cache


class _OldStyleModel(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=False):  # the name before transformers' rename
        return input_ids


def test_with_cache_uses_the_name_the_forward_takes():
    cache = object()
    backbone, _ = build_backbone("tiny", num_new_tokens=8)
    # The installed transformers takes `cache`; passing it by the old name warns and is going away.
    assert with_cache(backbone, cache) == {"cache": cache}
    assert with_cache(_OldStyleModel(), cache) == {"past_key_values": cache}
