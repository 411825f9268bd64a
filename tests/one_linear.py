"""The one-layer model several method test files build on (a single ``fc`` Linear), its seeded inputs, and a
closeness check relative to the size of the expected values."""

from __future__ import annotations

import torch
from torch import nn


class One(nn.Module):
    def __init__(self, d_in: int = 24, d_out: int = 16, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def one(d_in: int = 24, d_out: int = 16, bias: bool = True, seed: int = 0) -> One:
    """A fresh :class:`One` in eval mode, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return One(d_in, d_out, bias).eval()


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    """Standard-normal input of ``shape`` from a generator of its own (the global RNG is untouched)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """``actual`` equals ``expected`` to ``rel`` times the largest ``|expected|``."""
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.abs().max()))
