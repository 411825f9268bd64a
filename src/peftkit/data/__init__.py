"""Embedded data sets and tokenisation helpers (see :mod:`peftkit.data.text`)."""

from .text import (
    ROTTEN_TOMATOES,
    Batches,
    TextData,
    collate,
    encode,
    infer_label_names,
    load_data,
    load_rotten_tomatoes,
    load_table,
    pad_token_id,
    split_indices,
)

__all__ = [
    "ROTTEN_TOMATOES", "Batches", "TextData", "collate", "encode", "infer_label_names", "load_data",
    "load_rotten_tomatoes", "load_table", "pad_token_id", "split_indices",
]
