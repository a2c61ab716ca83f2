"""Datasets (reading in blocks, k-core, writing) and the leave-one-out split as offsets into one array."""

from nezha.data.amazon import load_amazon_raw
from nezha.data.datasets import DataError, Dataset, load_dataset, resolve_data_dir, write_dataset
from nezha.data.split import Examples, Ragged, Split, leave_one_out

__all__ = [
    "DataError",
    "Dataset",
    "Examples",
    "Ragged",
    "Split",
    "leave_one_out",
    "load_amazon_raw",
    "load_dataset",
    "resolve_data_dir",
    "write_dataset",
]
