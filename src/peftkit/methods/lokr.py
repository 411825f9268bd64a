"""LoKr — Yeh et al., ICLR 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation" (arXiv 2309.14859), as LyCORIS and Hugging Face PEFT (``peft/tuners/lokr``) define it; reads and writes
PEFT's ``LOKR`` files. (peftkit's ``kron`` is DiffuseKronA, another Kronecker method with its own shapes and init.)

    forward:  y = base(x) + x·ΔWᵀ (a convolution: conv(x, ΔW)), ΔW built from the factors (PEFT's LycorisLayer)
    ΔW:       s·W1 ⊗ W2 reshaped to the host weight,  s = α/r;  d_out = a·b, c_in = c·d from PEFT's
              ``factorization`` (the divisor pair nearest √n, or one side = ``decompose_factor``): W1 ∈ R^{a×c},
              W2 ∈ R^{b×d} (a convolution: b×d×kh×kw, W1 as a×c×1×1); W1 = W1a·W1b (rank r) when ``decompose_both``
              and r < max(a, c)/2, W2 = W2a·W2b (rank r; a convolution's W2b: r×d·kh·kw) when r < max(b, d)/2, or with
              ``use_effective_conv2d`` a Tucker core T2 (r, r, kh, kw) ×₁ W2aᵀ ×₂ W2bᵀ
    init:     W1 (or W1a) = 0, the rest kaiming_uniform(a=√5) ⇒ ΔW = 0 (PEFT's init_weights=True); "lycoris": W2 (or
              W2b) = 0, the rest kaiming; "random": all kaiming (ΔW ≠ 0, for tests)
    merge:    W ← W0 + ΔW   (rank(W1 ⊗ W2) = rank(W1)·rank(W2): full rank possible)

Following PEFT's code where it differs from LyCORIS: s = α/r even when neither factor is decomposed (LyCORIS
then uses 1), and a Conv1d whose W2 is kept whole (b×d×k) is combined by ``torch.kron`` of a 2-D W1 with a 3-D W2
((b, a·d, c·k), reshaped to the weight's (d_out, c_in, k)) exactly as PEFT does. Rank and module dropout (with
``rank_dropout_scale``): see ``_lycoris.py``. As the sole active adapter with at least d_out rows (training batches,
no dropout, float32/64) a Linear layer runs as x·(W0 + ΔW)ᵀ + b through ``core.dense``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register
from peftkit.methods._lycoris import LYCORIS_HOSTS, LycorisConfig, LycorisUpdate, effective_conv, kernel, lycoris_names

_INIT_TO_PEFT: dict[str, Any] = {"default": True, "random": False, "lycoris": "lycoris"}


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr. ``decompose_both``: factor W1 too; ``decompose_factor``: the size of one side of each factorisation
    (−1: as square as possible); ``rank_dropout_scale``: rescale the rows kept by rank dropout; ``init``:
    ``"default"``, ``"lycoris"`` or ``"random"``. Accepts Hugging Face PEFT ``LoKrConfig``'s field names."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    inits: ClassVar[tuple[str, ...]] = ("default", "lycoris", "random")
    peft_type = "LOKR"
    peft_names = lycoris_names({True: "default", False: "random", "lycoris": "lycoris"})

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise PeftkitError(f"LoKrConfig.decompose_factor must be -1 or a positive integer, got "
                               f"{self.decompose_factor}")


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """(m, k) with m·k = n and m ≤ k: ``factor`` itself when it divides n; else the divisor pair reached by raising m
    through the divisors of n while m + k shrinks and m stays ≤ ``factor`` (−1: no bound) — PEFT's / LyCORIS's
    rule, e.g. 256 → (16, 16), 128 → (8, 16), 127 → (1, 127), 128 with factor 4 → (4, 32)."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    bound = n if factor == -1 else factor
    m, k = 1, n
    while m < k:
        m2 = m + 1
        while n % m2:
            m2 += 1
        k2 = n // m2
        if m2 + k2 > m + k or m2 > bound:
            break
        m, k = m2, k2
    return (k, m) if m > k else (m, k)


def _plan(host: Host, config: LoKrConfig) -> tuple[int, int, int, int, bool, bool]:
    """(a, b, c, d, W1 whole, W2 whole) for ``host`` (see the module docstring)."""
    c_in = host.module.in_channels if host.is_conv else host.d_in
    c, d = factorization(c_in, config.decompose_factor)
    a, b = factorization(host.d_out, config.decompose_factor)
    r = config.r
    return a, b, c, d, not (config.decompose_both and r < max(a, c) / 2), not r < max(b, d) / 2


@register(
    "lokr",
    config=LoKrConfig,
    family="reparameterized",
    paper="Yeh et al., ICLR 2024, LyCORIS (arXiv 2309.14859), as Hugging Face PEFT's LoKr",
    description="Kronecker product s·W1⊗W2 of a small and a (low-rank) large factor, PEFT / LyCORIS's LoKr",
    params="a·c (or r·(a + c)) + b·d·k (or r·(b + d·k), effective conv r²·k + r·(b + d)); d_out = a·b, c_in = c·d",
    hosts=LYCORIS_HOSTS,
    hf_peft_type="LOKR",
)
class LoKr(LycorisUpdate):
    def __init__(self, host: Host, config: LoKrConfig) -> None:
        super().__init__(host, config)
        w1_zero, w2_zero = config.init == "default", config.init == "lycoris"
        with torch.no_grad():  # PEFT's order: W1 (or W1a, W1b), W2 (or W2a, W2b), T2
            (self._zeros if w1_zero else self._kaiming)("lokr_w1", "lokr_w1_a")
            self._kaiming("lokr_w1_b")
            (self._zeros if w2_zero else self._kaiming)("lokr_w2")
            self._kaiming("lokr_w2_a")
            (self._zeros if w2_zero else self._kaiming)("lokr_w2_b")
            self._kaiming("lokr_t2")

    def _rescale_rank_dropout(self) -> bool:
        return self.config.rank_dropout_scale

    @classmethod
    def shapes(cls, host: Host, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
        a, b, c, d, w1_whole, w2_whole = _plan(host, config)
        r = config.r
        out: dict[str, tuple[int, ...]] = (
            {"lokr_w1": (a, c)} if w1_whole else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)})
        k = tuple(host.module.kernel_size) if host.is_conv else ()
        if w2_whole:
            out["lokr_w2"] = (b, d, *k)
        elif effective_conv(host, config):
            out.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *kernel(host)))
        else:
            out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(k)))
        return out

    def delta_weight(self) -> torch.Tensor:
        p = self._parameters
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            # a true row-major copy: torch.kron fails on some einsum outputs whose size-1 dims carry odd strides
            # (PEFT's ``.contiguous()`` keeps them — it raises there, e.g. a Conv1d core at r = 1)
            w2 = w2.clone(memory_format=torch.contiguous_format)
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.s).reshape(self.host.d_out, self.host.d_in)

    @classmethod
    def config_class(cls) -> type[LoKrConfig]:
        return LoKrConfig

    @classmethod
    def to_hf_config(cls, config: LoKrConfig, hosts: list[Host]) -> dict[str, Any]:
        return {**cls.lycoris_to_hf(config, _INIT_TO_PEFT), "decompose_both": config.decompose_both,
                "decompose_factor": config.decompose_factor, "rank_dropout_scale": config.rank_dropout_scale}
