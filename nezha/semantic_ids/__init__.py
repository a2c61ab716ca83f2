"""Semantic IDs: item text embeddings and RQ-KMeans codes, unique per item."""

from nezha.semantic_ids.embed import embed_texts
from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_new_item, assign_unique_codes

__all__ = ["ResidualQuantizer", "assign_new_item", "assign_unique_codes", "embed_texts"]
