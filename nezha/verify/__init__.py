"""Semantic-ID codec and model-free verification of generated IDs."""

from nezha.verify.codec import pack, prefix_of, radix_weights, random_packed_ids, unpack
from nezha.verify.verifier import PrefixVerifier

__all__ = ["PrefixVerifier", "pack", "prefix_of", "radix_weights", "random_packed_ids", "unpack"]
