"""FourierFT — Gao et al., ICML 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform"
(arXiv 2405.03003), as Hugging Face PEFT (``peft/tuners/fourierft``) defines it; reads and writes PEFT's
``FOURIERFT`` files.

    forward:  y = base(x) + x·ΔWᵀ,  ΔW built from the n trained coefficients c at n fixed frequencies
    ΔW:       ΔW = α·Re(IDFT2(S)),  S ∈ C^{d_out×d_in} zero but S[r_k, l_k] = c_k;  the n locations (r_k, l_k) are the
              first n of a random permutation of the d_out·d_in positions, seeded with ``seed`` (shared by all layers,
              PEFT's ``random_loc_seed``): ΔW[j, l] = α/(d_out·d_in)·Σ_k c_k·cos(2π(j·r_k/d_out + l·l_k/d_in))
    init:     c ~ N(0, 1) (PEFT's default, ``init_weights=False``: ΔW ≠ 0 at init, as in the paper), or c = 0 with
              init="zeros" (PEFT's ``init_weights=True``)
    merge:    W ← W0 + ΔW

Trainable: c ∈ R^n per layer (the locations are regenerated from the seed, never saved). α = ``scale`` (PEFT's
``scaling``, default 150). The frequency draw and the sparse inverse DFT live in :mod:`peftkit.ops.spectral` (shared
with spectral methods such as LoCA's DCT). As in PEFT, ΔW is built by a dense inverse FFT in float32 (d_out·d_in·log,
never activation-sized); as the sole active adapter with at least d_out rows (no dropout, float32/64) the layer runs
as x·(W0 + ΔW)ᵀ + b through ``core.dense``, otherwise as base(x) + x·ΔWᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import DenseUpdate
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, config_from_hf
from peftkit.core.host import Host
from peftkit.core.peft_names import DROP, TARGETING, PeftName, alias, bias_alias, plain
from peftkit.core.registry import register
from peftkit.ops.spectral import random_frequencies, sparse_ifft2_real

_HOSTS = ("linear", "gpt2_conv1d")
_INIT_TO_PEFT = {"gaussian": False, "zeros": True}


def _n_overrides(_: Any, fields: Any) -> Any:
    """PEFT's ``n_frequency_pattern`` (first match wins) as ``overrides`` (last match wins): reversed."""
    pattern = plain(fields.get("n_frequency_pattern")) or {}
    return {p: {"n": v} for p, v in reversed(list(pattern.items()))} or DROP


@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT. ``n``: spectral coefficients per layer (at most d_out·d_in); ``scale``: α; ``seed``: seed of the
    frequency locations; ``init``: ``"gaussian"`` (PEFT's default) or ``"zeros"`` (ΔW = 0 at init). Accepts Hugging
    Face PEFT ``FourierFTConfig``'s field names (``n_frequency``, ``scaling``, ``random_loc_seed``,
    ``n_frequency_pattern``, ``init_weights``, ``bias="fourier_only"``)."""

    n: int = 1000
    scale: float = 150.0
    seed: int = 777
    init: str = "gaussian"

    peft_type = "FOURIERFT"
    peft_names = {
        **TARGETING,
        "bias": bias_alias("fourier_only"),
        "n_frequency": alias("n"),
        "scaling": alias("scale"),
        "random_loc_seed": alias("seed"),
        "n_frequency_pattern": PeftName("overrides", _n_overrides),
        "init_weights": alias("init", lambda v: "zeros" if v else "gaussian"),
    }

    def validate(self) -> None:
        super().validate()
        if self.n <= 0:
            raise PeftkitError(f"FourierFTConfig.n must be a positive integer, got {self.n}")
        if self.init not in _INIT_TO_PEFT:
            raise PeftkitError(f"FourierFTConfig.init must be 'gaussian' or 'zeros', got {self.init!r}")
        if any(set(ov) - {"n"} for ov in self.overrides.values()):
            raise PeftkitError("FourierFTConfig.overrides may only set n per module (PEFT's n_frequency_pattern)")


@register(
    "fourierft",
    config=FourierFTConfig,
    family="reparameterized",
    paper="Gao et al., ICML 2024, FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform "
          "(arXiv 2405.03003)",
    description="n trained spectral coefficients at seeded random frequencies; ΔW = α·Re(IDFT2(sparse spectrum))",
    params="n",
    hosts=_HOSTS,
    hf_peft_type="FOURIERFT",
    init_is_identity=False,  # PEFT's (and the paper's) default: Gaussian coefficients; init="zeros" starts at W0
)
class FourierFT(DenseUpdate, Adapter):
    #: in a Hugging Face file the layer shape goes into the weights' metadata (PEFT ignores it), so peftkit still
    #: refuses to load the file into a base of another shape
    hf_metadata_tensors = ("fourierft_shape",)
    def __init__(self, host: Host, config: FourierFTConfig) -> None:
        super().__init__(host, config)
        dev = host.weight.device
        # the layer's (d_out, d_in), saved: the coefficients alone fit any layer, so a load checks it (check_loaded)
        self.register_buffer("fourierft_shape", torch.tensor([host.d_out, host.d_in], device=dev))
        self.register_buffer("locations", random_frequencies(host.d_out, host.d_in, config.n, config.seed).to(dev),
                             persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(config.n, device=dev))
        if config.init == "gaussian":
            with torch.no_grad():  # the global RNG, as PEFT's torch.randn
                self.fourierft_spectrum.copy_(torch.randn(config.n))
        self.s = config.scale
        self.dropout = make_dropout(config.dropout)

    def delta_weight(self) -> torch.Tensor:
        c = self.fourierft_spectrum
        return (sparse_ifft2_real(c, self.locations, self.host.d_out, self.host.d_in) * self.s).to(c.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw = self.delta_weight()
        return self.host.apply_weight(self.dropout(x).to(dw.dtype), dw)

    def check_loaded(self) -> None:
        shape = (self.host.d_out, self.host.d_in)
        if tuple(self.fourierft_shape.tolist()) != shape:
            raise PeftkitError(f"tensor 'adapter.{self.host.name}.fourierft_shape' records a FourierFT layer of "
                               f"(d_out, d_in) = {tuple(self.fourierft_shape.tolist())} but module "
                               f"{self.host.name!r} is {shape} (its frequencies would differ); refusing to load")

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {"n": host.d_out * host.d_in}  # n distinct frequencies of a d_out×d_in spectrum

    @classmethod
    def expected_params(cls, host: Host, config: FourierFTConfig) -> int:
        return config.n

    # -- Hugging Face PEFT: peft_type FOURIERFT, <module>.fourierft_spectrum ------------------------------------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> FourierFTConfig:
        return config_from_hf(FourierFTConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: FourierFTConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.dropout > 0:
            raise PeftkitError("cannot export to Hugging Face PEFT format: its FourierFT has no input dropout "
                               f"(dropout={config.dropout})")
        return {
            "n_frequency": config.n,
            "scaling": config.scale,
            "random_loc_seed": config.seed,
            "init_weights": _INIT_TO_PEFT[config.init],
            "bias": {"adapter_only": "fourier_only"}.get(config.bias, config.bias),
            "n_frequency_pattern": {p: ov["n"] for p, ov in reversed(list(config.overrides.items()))},
            "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def hf_layout(cls, host: Host, config: FourierFTConfig) -> dict[str, HFTensor] | None:
        if host.kind not in _HOSTS:
            return None
        return {"fourierft_spectrum": HFTensor("fourierft_spectrum", (config.n,), (config.n,)),
                "fourierft_shape": HFTensor("", (2,), (2,), value=torch.tensor([host.d_out, host.d_in]))}
