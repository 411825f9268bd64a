"""MAM adapter (Mix-And-Match) — He et al., ICLR 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning" (arXiv 2110.04366), as AdapterHub's ``MAMConfig`` (prefix tuning + a scaled parallel bottleneck adapter,
``ParBnConfig``), assembled from peftkit's own ``prefix_tuning`` and ``parallel_adapter`` (see methods/_hybrid.py).

    forward:  · prefix on every attention layer:  K = [P_K; X·W_k],  V = [P_V; X·W_v],  P = MLP(E) (prefix tuning)
              · parallel adapter on the FFN's output projection:  y = W·x + b + s·U·σ(D·x),  s = 4
    init:     the adapter's U = 0 ("mam" init, D kaiming-uniform); the prefix as prefix tuning draws it ⇒ at init
              the model differs from the base by the prefix only
    merge:    none (the prefix is extra attention context)

Trainable: prefix tuning's count + m·(d_in + d_out) per FFN layer, m = ⌊d / reduction_factor⌋ (d: the layer's
output width, the model's hidden size). The sum of the two equals a ``prefix_tuning`` adapter and a
``parallel_adapter`` adapter active together (tests/methods/test_hybrid.py checks it); MAM makes them one adapter
that saves, loads and trains as one. Defaults are AdapterHub's: prefix length 30 with a reparametrising MLP of
width 800, adapter d/2 with ReLU and scaling 4 (He et al.'s r = 512 on d = 1024).

Deviation: He et al.'s parallel adapter reads the FFN block's input and adds to its output; peftkit's layer pieces
see one layer, so the adapter runs beside the FFN's output projection and reads that projection's input (the FFN's
hidden activations, width d_in = the FFN's inner width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from peftkit.core.errors import PeftkitError
from peftkit.core.model_level import ModelLevelConfig
from peftkit.core.registry import register
from peftkit.methods._hybrid import HybridAdapter, Part
from peftkit.methods.bottleneck import FFN_OUTPUT, ParallelAdapter, ParallelAdapterConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig


@dataclass
class MAMConfig(ModelLevelConfig):
    """MAM (AdapterHub's defaults). ``prefix_length``: the prefix's length P; ``prefix_bottleneck_size``: the width of
    its reparametrising MLP; ``reduction_factor``: the parallel adapter's bottleneck is ⌊d / reduction_factor⌋;
    ``non_linearity``: its activation σ; ``scaling``: its scale s, a number or "learned"; ``adapter_modules``: where
    it goes (the FFN output projections); ``dropout``: on the adapter's input and on the prefix."""

    prefix_length: int = 30
    prefix_bottleneck_size: int = 800
    reduction_factor: float = 2.0
    non_linearity: Literal["relu", "tanh", "gelu", "silu", "sigmoid", "identity"] = "relu"
    scaling: float | Literal["learned"] = 4.0
    adapter_modules: list[str] | str = FFN_OUTPUT

    def validate(self) -> None:
        super().validate()
        for name in ("prefix_length", "prefix_bottleneck_size", "reduction_factor"):
            self.positive(f"MAMConfig.{name}", getattr(self, name))


@register(
    "mam",
    config=MAMConfig,
    family="hybrid",
    paper="He et al., ICLR 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv 2110.04366)",
    description="Mix-and-Match: prefix tuning on attention + a scaled parallel bottleneck adapter on the FFN "
                "(peftkit's prefix_tuning and parallel_adapter, as one adapter)",
    params="prefix tuning's P·d + (d+1)·m_P + (m_P+1)·2·L·d_kv + m·(d_in + d_out) per FFN layer — whole model",
    hosts=(),
    mergeable=False,
    init_is_identity=False,  # the prefix changes the output at init, as prefix tuning's does
    model_level=True,
    lr_scale=0.15,  # as prefix tuning: most of its values sit behind the reparametrising MLP
    head_lr_scale=1.0,
)
class MAM(HybridAdapter):
    @classmethod
    def parts(cls, config: MAMConfig) -> list[Part]:
        def adapter_config(host):  # noqa: ANN001, ANN202
            m = int(host.d_out // config.reduction_factor)
            if m < 1:
                raise PeftkitError(f"mam on {host.name!r}: ⌊{host.d_out} / reduction_factor "
                                   f"{config.reduction_factor:g}⌋ = 0; lower reduction_factor")
            return ParallelAdapterConfig(bottleneck_size=m, non_linearity=config.non_linearity,
                                         scaling=config.scaling, dropout=config.dropout)

        return [Part("adapter", ParallelAdapter, config.adapter_modules, adapter_config)]

    @classmethod
    def prefix_config(cls, config: MAMConfig) -> PrefixTuningConfig:
        return PrefixTuningConfig(num_virtual_tokens=config.prefix_length,
                                  encoder_hidden_size=config.prefix_bottleneck_size, dropout=config.dropout)
