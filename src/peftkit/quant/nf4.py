"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, QLoRA) block-wise quantisation in plain PyTorch, as bitsandbytes
does it (``quant_type="nf4"``, ``compress_statistics=False``): the weight flattened row-major is cut into blocks of
``blocksize`` values; each block is divided by its absolute maximum and every value is rounded to the nearest of the
16 NF4 levels below; it dequantises to ``level · absmax``. No bitsandbytes needed (LoftQ's init uses it on any
device); ``tests`` check it against bitsandbytes' own quantise → dequantise.
"""

from __future__ import annotations

import torch

from ..core.errors import PeftkitError

#: bitsandbytes' NF4 levels (``bitsandbytes.functional.get_4bit_type("nf4")``), ascending
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_codes(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: uint8 codes 0..15 in ``w``'s shape and the float32 absmax of each block."""
    if blocksize < 1:
        raise PeftkitError(f"nf4: blocksize must be a positive integer, got {blocksize!r}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)  # nearest level
    return codes.reshape(-1)[:n].view(w.shape).to(torch.uint8), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """float32 ``level[code] · absmax`` in ``codes``' shape."""
    levels = torch.tensor(NF4_LEVELS, device=codes.device)
    flat = levels[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (flat * scale).view(codes.shape)


def nf4_round_trip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``w`` quantised to NF4 and dequantised (float32): what a bitsandbytes NF4 layer would compute with."""
    return nf4_dequantize(*nf4_codes(w, blocksize), blocksize)
