"""Task-vector merging: magnitude pruning, TIES and DARE — the maths behind ``peftkit.combine(how=…)``.

Given task tensors ``t_i`` (same shape) and weights ``w_i``:

- ``magnitude_prune``: keep the ``⌊density·n⌋`` largest-magnitude entries of each ``t_i``, then ``Σ w_i t_i``;
- ``ties`` (Yadav et al. 2023, TIES-Merging, arXiv 2306.01708): trim as above, elect a sign per entry (the sign of
  ``Σ_i t_i`` — ``"total"`` — or of ``Σ_i sign(t_i)`` — ``"frequency"``), then the disjoint mean: per entry the sum of
  the ``w_i t_i`` that agree with the elected sign divided by how many ``t_i`` agree;
- ``dare_linear`` (Yu et al. 2024, DARE, arXiv 2311.03099): drop each entry with probability ``1 − density`` and
  rescale the kept ones by ``1/density``, then ``Σ w_i t_i``; ``dare_ties``: DARE's drop-and-rescale, then TIES' sign
  election and disjoint mean.

These follow Hugging Face PEFT's ``utils/merge_utils`` definitions (so ``combine`` reproduces its
``add_weighted_adapter`` numbers): random drops draw ``torch.bernoulli`` from torch's global generator, one draw per
task tensor in order, unless a ``generator`` is given. Written here rather than imported from ``peft`` because
``peft`` is only a test dependency of peftkit.
"""

from __future__ import annotations

import torch

SIGN_METHODS = ("total", "frequency")


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``⌊density·numel⌋`` largest-magnitude entries set to 0 (``density ≥ 1``: ``t``)."""
    if density >= 1:
        return t
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def random_drop(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and the kept ones divided by ``density``."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _weighted(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stack * weights.to(stack).view(weights.shape + (1,) * (stack.dim() - 1))


def elect_sign(stack: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Mask of the entries (over task tensors stacked on dim 0) whose sign is the elected one (ties go to +)."""
    votes = stack.sum(0) if method == "total" else stack.sign().sum(0)
    return stack.sign() == torch.where(votes >= 0, 1.0, -1.0).to(stack)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_task_tensors(
    how: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One merged tensor from ``tensors`` by ``how`` ∈ {``linear``, ``magnitude_prune``, ``ties``, ``dare_linear``,
    ``dare_ties``} (see the module docstring)."""
    if how in ("magnitude_prune", "ties"):
        tensors = [magnitude_mask(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [random_drop(t, density, generator) for t in tensors]
    stack = torch.stack(tensors, 0)
    weighted = _weighted(stack, weights)
    if how in ("ties", "dare_ties"):
        return disjoint_mean(weighted, elect_sign(stack, sign_method))
    return weighted.sum(0)
