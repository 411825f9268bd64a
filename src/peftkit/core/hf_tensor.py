"""Where an adapter tensor lives in a Hugging Face PEFT file — the one name the adapter protocol
(:meth:`~peftkit.core.adapter.Adapter.hf_layout`) shares with the PEFT format (:mod:`.hf`), kept apart so that the
adapter module does not import the format."""

from __future__ import annotations

from typing import NamedTuple

import torch


class HFTensor(NamedTuple):
    """Where one adapter tensor lives in a Hugging Face file: the key after ``<module path>.`` (adapter name
    removed, as PEFT saves it), its shape there, and its shape in peftkit (the two differ only by a reshape).
    ``base``: the file holds a trained *copy* of the host's own tensor of that name (e.g. LN tuning's γ) where
    peftkit keeps the difference to it, so ``file = host.<base> + ours``. ``value``: a tensor of peftkit's own saves
    that the Hugging Face file does not hold (e.g. a record of the layer's shape, checked at load): not written on
    export, and ``value`` (what the layer gives it) on import; ``key`` and the shapes are then unused."""

    key: str
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    base: str | None = None
    value: torch.Tensor | None = None
