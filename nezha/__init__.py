"""nezha: NEZHA self-drafting decoding for generative recommendation (arXiv 2511.18793)."""

__version__ = "0.1.0"
