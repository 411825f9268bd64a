"""Data-parallel training across processes (``torchrun``), with only the trainable parameters synchronised.

    torchrun --standalone --nproc_per_node 2 -m peftkit train --batch-size 16 ...

Each of the N processes holds the whole (frozen) base model and the adapter. Every optimiser step consumes one
*global* batch of N·b examples (``--batch-size b`` is per process, as with ``torchrun`` elsewhere): process k
takes the k-th slice (:class:`Shard`), computes its loss and gradients, and then one ``all_reduce`` over a single
flat buffer holding every trainable parameter's gradient (scaled by the slice's example count) plus that count
gives each process the gradient of the mean loss over the global batch:

    g = Σ_k n_k · g_k / Σ_k n_k

which for a per-example mean loss is exactly the gradient one process would compute on the whole batch — so N
processes with batch b train the same adapter as one process with batch N·b (up to float summation order). The
frozen base never crosses the wire; the adapter's initial values are broadcast from rank 0 once so every process
starts identical. Then every process applies the same clipped AdamW step and the adapters stay identical. Only
rank 0 prints, draws a progress bar and writes files.

The trainer synchronises the parameters in its optimiser; a procedure that trains tensors with an optimiser of its
own averages their gradients with :func:`sync_gradients` too (DiffoRA's selection logits θ).

Dropout draws different masks in different processes (each has its own RNG stream); with dropout > 0 the N-process
run is a valid data-parallel run but not bit-comparable to the 1-process one.

The backend follows the device (:func:`backend_for`): ``nccl`` when the processes train on CUDA — each on
``cuda:LOCAL_RANK``, one GPU per process (``peftkit train --device cuda|auto``) — and ``gloo`` otherwise (CPU, MPS).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import PeftkitError
from ..core.procedure import sync_gradients as sync_gradients  # re-exported: the trainer's gradient sync


def world() -> tuple[int, int]:
    """``(rank, size)`` of the initialised process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for training on ``device``: ``nccl`` for CUDA, ``gloo`` for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int | None:
    """``LOCAL_RANK`` under ``torchrun`` (this process's index on its node), None in a plain process."""
    if env_world_size() <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_from_env(backend: str | None = None, device: torch.device | str | None = None) -> tuple[int, int]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment); returns
    ``(rank, size)``. A no-op in a plain process. The backend is ``backend``, else :func:`backend_for` ``device``
    (gloo when no device is given); on a CUDA device this process's current GPU is set first."""
    size = env_world_size()
    if size <= 1:
        return 0, 1
    if not dist.is_available():
        raise PeftkitError("this torch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend or (backend_for(device) if device is not None else "gloo"))
    return world()


class Shard:
    """Rank ``rank``'s slice of every batch of ``batches`` (each tensor split along dim 0 into ``size`` nearly equal
    parts; other values are passed through)."""

    def __init__(self, batches: Iterable[Any], rank: int, size: int) -> None:
        if not 0 <= rank < size:
            raise PeftkitError(f"rank {rank} is outside a world of {size}")
        self.batches, self.rank, self.size = batches, rank, size

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def _slice(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim():
            return torch.tensor_split(value, self.size)[self.rank]
        if isinstance(value, Mapping):
            return {k: self._slice(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return type(value)(self._slice(v) for v in value)
        return value

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield self._slice(batch)


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every process (one flat broadcast)."""
    if world()[1] <= 1 or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[offset: offset + n].view_as(p))
            offset += n
