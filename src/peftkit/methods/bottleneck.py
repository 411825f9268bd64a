"""Bottleneck adapters of LLM-Adapters — Hu et al. 2023, "LLM-Adapters: An Adapter Family for Parameter-Efficient
Fine-Tuning of Large Language Models" (arXiv 2304.01933): the series adapter (Houlsby et al. 2019, arXiv 1902.00751)
and the parallel adapter (He et al. 2022, arXiv 2110.04366), as in the official ``peft/src/peft/tuners/bottleneck.py``.

    f(z) = s · σ(drop(z)·Dᵀ)·Uᵀ     D ∈ R^{m×c}, U ∈ R^{c'×m}, no biases, computed in fp32; s fixed or learned (init 1)
    series "output_adapter":  y = h + f(h),  h = W·x + b        (D: d_out → m, U: m → d_out)    ⇒ Δ = f(base_out)
    series "mh_adapter":      y = W·(x + f(x)) + b               (D: c_in → m, U: m → c_in)      ⇒ Δ = W·f(x)
    parallel:                 y = W·x + b + f(x)                 (D: d_in → m, U: m → d_out)    ⇒ Δ = f(x)
    init:   "mam": D ~ kaiming_uniform(a=√5), U = 0 ⇒ f ≡ 0, the base model bit for bit;  "bert": D, U ~ N(0, 0.02²)
    merge:  none — σ sits between D and U, so no weight reproduces f (mergeable=False)

Both placements are written as the core's ``delta(x, base_out)``, so disable, mixed batches, save/load and several
adapters per layer need nothing of their own. "mh_adapter" runs f on the host's input channels (features of a Linear
or GPT-2 Conv1D, input channels of a convolution) and pushes f(x) through the frozen host weight without its bias;
"output_adapter" runs f channel-wise on the host output. The parallel adapter reads the host input the way the host
does (a convolution's D is a kernel like the host's, U a 1×1 kernel; on an embedding D is a lookup table), so it
works on every host kind. Two registrations share the ``_Bottleneck`` base: ``series_adapter`` (field
``placement``) and ``parallel_adapter``; each gets its own conformance-matrix row and parameter formula. Default
targets are the paper's best placements: the series adapter after the MLP (its down projection), the parallel
adapter on both MLP projections — by name for LLaMA-style, GPT-J, OPT, BLOOM and BERT/RoBERTa models.

Deviation: LLM-Adapters defaults to ``init_weights="bert"``, which changes the model at init; peftkit defaults to
``"mam"`` so that an adapter starts exactly at the base model (pass ``init="bert"`` for the paper's setup). The
official ``use_adapterp`` (Pfeiffer) flag is never read by its layer code and is not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
    "identity": nn.Identity(),
}


@dataclass
class BottleneckConfig(AdapterConfig):
    """Shared fields. ``bottleneck_size`` m; ``non_linearity`` σ; ``scaling`` a number or ``"learned"`` (a scalar
    parameter per layer, initialised to 1); ``init`` ``"mam"`` (identity at init) or ``"bert"`` (N(0, 0.02²))."""

    bottleneck_size: int = 256
    non_linearity: Literal["tanh", "relu", "gelu", "silu", "sigmoid", "identity"] = "tanh"
    scaling: float | Literal["learned"] = 1.0
    init: Literal["mam", "bert"] = "mam"

    def validate(self) -> None:
        super().validate()
        self.positive(f"{type(self).__name__}.bottleneck_size", self.bottleneck_size)


#: the MLP's down projection — LLaMA/Mistral/Qwen, GPT-J, OPT/CLIP/ViT, BLOOM/GPT-NeoX, BERT/RoBERTa (not the
#: attention's output.dense)
SERIES_TARGETS = r"(.*\.)?(down_proj|fc_out|fc2|dense_4h_to_h|layer\.\d+\.output\.dense)"
#: the FFN's output projection of the same families and GPT-2 (``mlp.c_proj``): where Compacter, UniPELT and MAM put
#: their adapter
FFN_OUTPUT = SERIES_TARGETS[:-1] + r"|mlp\.c_proj)"
#: both MLP projections (up and down) of the same families
PARALLEL_TARGETS = (r"(.*\.)?(up_proj|down_proj|fc_in|fc_out|fc1|fc2|dense_h_to_4h|dense_4h_to_h|intermediate\.dense"
                    r"|layer\.\d+\.output\.dense)")


@dataclass
class SeriesAdapterConfig(BottleneckConfig):
    """Series adapter. ``placement``: ``"output_adapter"`` (after the host — by default the MLP's down projection,
    the placement LLM-Adapters found best) or ``"mh_adapter"`` (before the host, e.g. LLaMA's ``up_proj`` and
    ``gate_proj``)."""

    target_modules: list[str] | str | None = SERIES_TARGETS
    placement: Literal["output_adapter", "mh_adapter"] = "output_adapter"


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    """Parallel adapter: f(x) added to the host output; by default on both MLP projections (LLM-Adapters: LLaMA
    ``up_proj`` and ``down_proj``, the placement it found best)."""

    target_modules: list[str] | str | None = PARALLEL_TARGETS


class _Bottleneck(Adapter):
    """D (m, c_down), U (c_up, m) and the optional learned scale; subclasses say what f reads and where it goes."""
    additive = False  # reads the host output / weight (see Adapter.additive)

    def _build(self, c_down: int, c_up: int) -> None:
        cfg = self.config
        dev = self.host.weight.device
        self.m, self.act = cfg.bottleneck_size, cfg.non_linearity
        self.adapter_down = nn.Parameter(torch.empty(self.m, c_down, device=dev))
        self.adapter_up = nn.Parameter(torch.zeros(c_up, self.m, device=dev))
        if cfg.init == "bert":
            nn.init.normal_(self.adapter_down, std=0.02)
            nn.init.normal_(self.adapter_up, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))
        self.learned = cfg.scaling == "learned"
        if self.learned:
            self.adapter_scale = nn.Parameter(torch.ones((), device=dev))
        else:
            self.s = float(cfg.scaling)
        self.dropout = make_dropout(cfg.dropout)

    def _up(self, h: torch.Tensor) -> torch.Tensor:
        """s·σ(h)·Uᵀ for the down-projected ``h`` (channel-wise on feature maps), in fp32."""
        out = self.host.project_out(ACTIVATIONS[self.act](h), self.adapter_up.float())
        if self.learned:
            return out * self.adapter_scale.float()
        return out * self.s if self.s != 1.0 else out

    def _channelwise(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) for features ``z`` whose channels D reads (last dim, or dim 1 of a convolution's maps)."""
        return self._up(self.host.project_out(self.dropout(z).float(), self.adapter_down.float()))

    @staticmethod
    def _extra(config: BottleneckConfig) -> int:
        return 1 if config.scaling == "learned" else 0


@register(
    "series_adapter",
    config=SeriesAdapterConfig,
    family="adapter",
    paper="Hu et al. 2023, LLM-Adapters (arXiv 2304.01933); Houlsby et al. 2019 (arXiv 1902.00751)",
    description="bottleneck adapter s·U·σ(D·z) in series with the host: on its output (output_adapter) or on its "
                "input, seen through the frozen weight (mh_adapter)",
    params="2·m·d_out (output_adapter) or 2·m·c_in (mh_adapter), +1 with learned scaling",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding"),
    mergeable=False,
)
class SeriesAdapter(_Bottleneck):
    def __init__(self, host: Host, config: SeriesAdapterConfig) -> None:
        super().__init__(host, config)
        self.before = config.placement == "mh_adapter"
        if self.before and host.kind == "embedding":
            raise PeftkitError(
                f"series_adapter placement 'mh_adapter' runs on the host's input features, but {host.name!r} is an "
                f"Embedding (its input is token ids); use placement='output_adapter' there"
            )
        c = self._channels(host, config)
        self._build(c, c)

    @staticmethod
    def _channels(host: Host, config: SeriesAdapterConfig) -> int:
        if config.placement == "output_adapter":
            return host.d_out
        return host.module.in_channels if host.is_conv else host.d_in

    def stacks(self) -> bool:  # after the layer it adapts whatever output it is given
        return not self.before

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self.before:
            return self._channelwise(base_out)
        w = self.host.weight_2d()
        return self.host.project_in(self._channelwise(x).to(w.dtype), w)

    @classmethod
    def expected_params(cls, host: Host, config: SeriesAdapterConfig) -> int:
        return 2 * config.bottleneck_size * cls._channels(host, config) + cls._extra(config)


@register(
    "parallel_adapter",
    config=ParallelAdapterConfig,
    family="adapter",
    paper="Hu et al. 2023, LLM-Adapters (arXiv 2304.01933); He et al. 2022 (arXiv 2110.04366)",
    description="bottleneck adapter s·U·σ(D·x) in parallel with the host (added to its output)",
    params="m·(d_in + d_out), +1 with learned scaling",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding"),
    mergeable=False,
    lr_scale=0.1,  # bottleneck 256 on the MLPs: 2e-3 collapsed in 300-step runs
)
class ParallelAdapter(_Bottleneck):
    output_only = True  # its delta reads only x: a branch added to whatever output it is given

    def __init__(self, host: Host, config: ParallelAdapterConfig) -> None:
        super().__init__(host, config)
        self._build(host.d_in, host.d_out)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        z = self.dropout(x).float() if x.is_floating_point() else x  # an embedding's input is token ids
        return self._up(self.host.project_in(z, self.adapter_down.float()))

    @classmethod
    def expected_params(cls, host: Host, config: ParallelAdapterConfig) -> int:
        return config.bottleneck_size * (host.d_in + host.d_out) + cls._extra(config)
