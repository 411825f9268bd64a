"""Composition of adapters, as AdapterHub's blocks (see :mod:`peftkit.core.blocks` for each block's rule)::

    from peftkit.compose import Stack, Parallel, Fuse, Split, BatchSplit, Average
    peftkit.set_active(model, Stack("lang", "task"))            # task applied on lang's output, per layer
    with peftkit.compose.active(model, Fuse("a", "b", name="f")):  # AdapterFusion: only its layers train
        ...
    peftkit.set_active(model, ["a", "b"])                        # a plain list still sums the adapters

Weight-space combination of low-rank adapters is :func:`combine` (``peftkit.combine``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .core.blocks import (
    Average,
    BatchSplit,
    Block,
    Fuse,
    Parallel,
    Split,
    Stack,
    active,
    active_block,
    add_fusion,
    delete_fusion,
    fusion_names,
    fusion_regularization,
)
from .core.compose import combine


def active_composition(model: nn.Module) -> Any:
    """The active composition block, or None when the active adapters are a plain list (summed)."""
    return active_block(model)


__all__ = [
    "Average", "BatchSplit", "Block", "Fuse", "Parallel", "Split", "Stack", "active", "active_composition",
    "add_fusion", "combine", "delete_fusion", "fusion_names", "fusion_regularization",
]
