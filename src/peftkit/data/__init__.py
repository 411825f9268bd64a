"""Embedded data sets and tokenisation helpers (see :mod:`peftkit.data.text`)."""

from .text import (
    MAX_CLASSES,
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
    present_labels,
    split_indices,
)

__all__ = [
    "MAX_CLASSES", "ROTTEN_TOMATOES", "Batches", "TextData", "collate", "encode", "infer_label_names", "load_data",
    "load_rotten_tomatoes", "load_table", "pad_token_id", "present_labels", "split_indices",
]
