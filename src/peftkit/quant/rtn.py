"""Group-wise asymmetric round-to-nearest (RTN) quantisation of a 2-D weight ``W ∈ R^{d_out×d_in}``.

Each row is cut into groups of ``group_size`` consecutive input columns (the last group of a row may be shorter;
``group_size >= d_in`` means one group per row). A group with minimum ``m`` and maximum ``M`` gets the step
``Δ = (M − m)/(2^b − 1)`` and the offset ``β = m``; every weight gets the integer code

    q = round(clamp((w − β)/Δ, 0, 2^b − 1))          (round half to even, as ``torch.round``)

and dequantises to ``q·Δ + β``. Codes are ``uint8`` (b ≤ 8), steps and offsets float32 of shape
``(d_out, ⌈d_in/group_size⌉)``. A group whose values are all equal gets Δ = 1e-8 (its codes are 0 and it
dequantises to ``m`` exactly). The same grouping, the same quantise expression and the same dequantise expression
are used by the LSQ fake quantiser (:mod:`peftkit.quant.lsq`), so a fake-quantised weight and the dequantised export
of its codes agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import PeftkitError

MIN_STEP = 1e-8  # step of a constant group (any positive value reproduces it exactly)


def check_bits(bits: int, where: str = "rtn") -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PeftkitError(f"{where}: bits must be an integer in 1..8 (codes are stored as uint8), got {bits!r}")


def check_group_size(group_size: int, where: str = "rtn") -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise PeftkitError(f"{where}: group_size must be a positive integer, got {group_size!r}")


def qmax(bits: int) -> int:
    """The largest code, ``2^bits − 1`` (the smallest is 0)."""
    return (1 << bits) - 1


def group_len(d_in: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or ``d_in`` when a row is shorter than one group."""
    return min(group_size, d_in)


def num_groups(d_in: int, group_size: int) -> int:
    """Groups per row: ``⌈d_in / group_size⌉``."""
    return math.ceil(d_in / group_len(d_in, group_size))


def grouped(w: torch.Tensor, group_size: int, fill: str = "edge") -> torch.Tensor:
    """A (d_out, d_in) tensor as (d_out, G, g): a view when g divides d_in, else a copy padded at the end of each
    row with that row's last value (``fill="edge"``: min/max unchanged) or zeros (``fill="zero"``: sums
    unchanged)."""
    d_out, d_in = w.shape
    g = group_len(d_in, group_size)
    pad = num_groups(d_in, group_size) * g - d_in
    if pad:
        tail = w[:, -1:].expand(d_out, pad) if fill == "edge" else w.new_zeros(d_out, pad)
        w = torch.cat([w, tail], dim=1)
    return w.reshape(d_out, -1, g)


def ungrouped(t: torch.Tensor, d_in: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: (d_out, G, g) back to (d_out, d_in) (padding dropped)."""
    return t.reshape(t.shape[0], -1)[:, :d_in]


def group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group sums of a (d_out, d_in) tensor: (d_out, G)."""
    return grouped(t, group_size, fill="zero").sum(-1)


def minmax_params(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max step and offset per group (float32, (d_out, G)): Δ = (max − min)/(2^b − 1), β = min."""
    check_bits(bits)
    check_group_size(group_size)
    if w.dim() != 2 or not w.is_floating_point():
        raise PeftkitError(f"rtn: expected a 2-D floating-point weight, got shape {tuple(w.shape)} {w.dtype}")
    wg = grouped(w.detach().float(), group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    step = ((hi - lo) / qmax(bits)).clamp_min(MIN_STEP)
    return step, lo


def codes_float(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``round(clamp((w − β)/Δ, 0, 2^b − 1))`` as float values, (d_out, d_in)."""
    v = (grouped(w, group_size) - offset.unsqueeze(-1)) / step.unsqueeze(-1)
    return ungrouped(v.clamp(0, qmax(bits)).round(), w.shape[1])


def quantize(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (uint8, (d_out, d_in)) of ``w`` for the given per-group step and offset."""
    check_bits(bits)
    return codes_float(w.float(), step, offset, bits, group_size).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``q·Δ + β`` per group, (d_out, d_in), in the step's dtype (or ``dtype``)."""
    q = grouped(codes.to(step.dtype), group_size)
    w = ungrouped(q * step.unsqueeze(-1) + offset.unsqueeze(-1), codes.shape[1])
    return w if dtype is None else w.to(dtype)


@dataclass
class QuantizedWeight:
    """A group-wise quantised weight: ``codes`` (uint8, (d_out, d_in)), ``step`` and ``offset`` ((d_out, G))."""

    codes: torch.Tensor
    step: torch.Tensor
    offset: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.step, self.offset, self.group_size, dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "step": self.step, "offset": self.offset}


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 64) -> QuantizedWeight:
    """Round-to-nearest quantisation of ``w`` with min/max step and offset per group."""
    step, offset = minmax_params(w, bits, group_size)
    return QuantizedWeight(quantize(w, step, offset, bits, group_size), step, offset, bits, group_size)
