"""What LoHa (``loha.py``) and LoKr (``lokr.py``) share, as Hugging Face PEFT's ``lycoris_utils`` defines it: the
config fields (r, α, rank and module dropout, the effective-conv option, rank/alpha patterns), the update applied as
one product through the built ΔW, and the PEFT file translation. Not a method (the registry skips ``_`` modules).

Forward of both, PEFT's ``LycorisLayer``: y = base(x) + host_op(dropout(x), ΔW) with ΔW built from the factors (a
Linear's x·ΔWᵀ, a convolution's conv(x, ΔW) with the host's stride/padding/dilation). While training:
``module_dropout`` p_m skips the whole update of a layer with probability p_m (one draw per forward), and
``rank_dropout`` p_r zeroes each output row of ΔW with probability p_r, rescaling the kept rows by 1/mean(kept)
(LoHa always, LoKr when ``rank_dropout_scale``). Both are off at evaluation; merging folds the plain ΔW in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import DenseUpdate
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, config_from_hf
from peftkit.core.host import Host
from peftkit.core.peft_names import (
    DROP,
    TARGETING,
    PeftName,
    overrides_to_patterns,
    patterns_to_overrides,
    plain,
    plain_number,
)

#: the host kinds both methods adapt (PEFT: nn.Linear, nn.Conv1d, nn.Conv2d; GPT-2's Conv1D here too, as a Linear)
LYCORIS_HOSTS = ("linear", "conv1d", "conv2d", "gpt2_conv1d")
_PEFT_HOSTS = ("linear", "conv1d", "conv2d")


def _overrides(_: Any, fields: Any) -> Any:
    rank, alpha = plain(fields.get("rank_pattern")) or {}, plain(fields.get("alpha_pattern")) or {}
    return patterns_to_overrides(dict(rank), dict(alpha)) if rank or alpha else DROP


def lycoris_names(inits: dict[Any, str]) -> dict[str, PeftName]:
    """PEFT's LyCORIS config fields; ``inits``: PEFT ``init_weights`` value → peftkit ``init``."""

    def init(v: Any, _: Any) -> str:
        for key, name in inits.items():
            if v is key or (isinstance(v, str) and v == key):
                return name
        raise PeftkitError(f"field init_weights={v!r} is not one of PEFT's {sorted(map(str, inits))}")

    return {
        **TARGETING,
        "init_weights": PeftName("init", init),
        "rank_pattern": PeftName("overrides", _overrides),
        "alpha_pattern": PeftName("overrides", _overrides),
    }


@dataclass
class LycorisConfig(AdapterConfig):
    """``r``: rank of each low-rank factor; ``alpha``: s = α/r; ``rank_dropout`` / ``module_dropout``: see the module
    docstring; ``use_effective_conv2d``: factor a convolution's kernel dimensions with a Tucker core (PEFT's name;
    kernels other than 1 / 1×1 only)."""

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init: str = "default"

    inits: ClassVar[tuple[str, ...]] = ("default", "random")

    def validate(self) -> None:
        super().validate()
        if self.init not in self.inits:
            raise PeftkitError(f"{type(self).__name__}.init must be one of {', '.join(self.inits)}, got {self.init!r}")
        if self.r <= 0:
            raise PeftkitError(f"{type(self).__name__}.r must be a positive integer, got {self.r}")
        for name in ("rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise PeftkitError(f"{type(self).__name__}.{name} must be in [0, 1), got {v}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def effective_conv(host: Host, config: LycorisConfig) -> bool:
    """Whether the kernel dimensions get a Tucker core: asked for, and a conv host with a kernel other than 1."""
    return config.use_effective_conv2d and host.is_conv and math.prod(host.module.kernel_size) != 1


def kernel(host: Host) -> tuple[int, int]:
    """A conv host's kernel as PEFT's Tucker core holds it: (kh, kw), or (k, 1) for a Conv1d."""
    k = tuple(host.module.kernel_size)
    return (k[0], k[1]) if len(k) == 2 else (k[0], 1)


class LycorisUpdate(DenseUpdate, Adapter):
    """Base of the LoHa / LoKr adapters: parameters from ``shapes`` (PEFT's names and shapes), the update through the
    built ΔW (``delta_weight``), rank / module dropout, PEFT's file format."""

    def _rescale_rank_dropout(self) -> bool:
        """Whether rank dropout rescales the kept rows (LoHa always; LoKr with ``rank_dropout_scale``)."""
        return True

    @classmethod
    def shapes(cls, host: Host, config: Any) -> dict[str, tuple[int, ...]]:
        """Parameter name (as in PEFT's files) → shape, on ``host``."""
        raise NotImplementedError

    def __init__(self, host: Host, config: LycorisConfig) -> None:
        super().__init__(host, config)
        dev = host.weight.device
        for name, shape in self.shapes(host, config).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=dev)))
        self.s = config.scaling
        self.dropout = make_dropout(config.dropout)

    def _kaiming(self, *names: str) -> None:
        for n in names:
            if n in self._parameters:
                nn.init.kaiming_uniform_(self._parameters[n], a=math.sqrt(5))

    def _zeros(self, *names: str) -> None:
        for n in names:
            if n in self._parameters:
                nn.init.zeros_(self._parameters[n])

    def _dropping(self) -> bool:
        c = self.config
        return self.training and (c.rank_dropout > 0 or c.module_dropout > 0)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self._dropping() else super().fused_forward(x)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.training and c.module_dropout > 0 and not bool(torch.rand(1) > c.module_dropout):
            return torch.zeros_like(base_out)
        dw = self.delta_weight()
        if self.training and c.rank_dropout > 0:
            keep = (torch.rand(dw.shape[0]) > c.rank_dropout).to(dw.dtype)
            if self._rescale_rank_dropout():
                keep = keep / keep.mean()
            dw = dw * keep.to(dw.device)[:, None]
        return self.host.apply_weight(self.dropout(x).to(dw.dtype), dw)

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {}  # r sizes factors whose products are combined (⊙, ⊗): PEFT allows any r

    @classmethod
    def expected_params(cls, host: Host, config: Any) -> int:
        return sum(math.prod(s) for s in cls.shapes(host, config).values())

    # -- Hugging Face PEFT format ------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> AdapterConfig:
        return config_from_hf(cls.config_class(), hf_config)

    @classmethod
    def config_class(cls) -> type[LycorisConfig]:
        raise NotImplementedError

    @classmethod
    def lycoris_to_hf(cls, config: LycorisConfig, init: dict[str, Any]) -> dict[str, Any]:
        """The shared fields of PEFT's LoHa / LoKr config for ``config``; ``init``: peftkit init → PEFT value."""
        if config.dropout > 0 or config.bias != "none":
            raise PeftkitError(
                "cannot export to Hugging Face PEFT format: its LoHa / LoKr have no input dropout and no trainable "
                f"biases (dropout={config.dropout}, bias={config.bias!r}); use rank_dropout / module_dropout instead"
            )
        rank, alpha = overrides_to_patterns(config.overrides)
        return {
            "r": config.r, "alpha": plain_number(config.alpha), "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout, "use_effective_conv2d": config.use_effective_conv2d,
            "init_weights": init[config.init], "rank_pattern": rank, "alpha_pattern": alpha,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def hf_layout(cls, host: Host, config: Any) -> dict[str, HFTensor] | None:
        if host.kind not in _PEFT_HOSTS:
            return None
        return {n: HFTensor(n, s, s) for n, s in cls.shapes(host, config).items()}
