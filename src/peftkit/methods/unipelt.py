"""UniPELT — Mao et al., ACL 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning"
(arXiv 2110.07577), as AdapterHub's ``UniPELTConfig`` (a union of LoRA, prefix tuning and a sequential bottleneck
adapter, each with ``use_gating=True``), assembled from peftkit's own pieces (see methods/_hybrid.py).

    forward:  · LoRA on the q/v projections:  y = W·x + g_L(x)·(α/r)·B·A·x
              · adapter after the FFN output projection:  y = h + g_A(h)·U·σ(D·h),  h = that projection's output
              · prefix on every attention layer:  K = [g_P(X)·P_K; X·W_k],  V = [g_P(X)·P_V; X·W_v],  P = MLP(E)
              · gates:  g(z) = mean_t σ(z_t·wᵀ + b), one per sample, component and layer
    init:     LoRA B = 0, adapter U = 0 ("mam" init), gates w ~ N(0, 0.02²), b = 0 (g = ½ at init); the prefix as
              prefix tuning draws it ⇒ at init the model differs from the base by the (half-gated) prefix only
    merge:    none (the gates depend on the input; the prefix is extra attention context)

Trainable: prefix tuning's count, + r·(d_in + d_out) + d_in + 1 per LoRA layer, + 2·m·d + d + 1 per adapter layer
(m = ⌊d / reduction_factor⌋), + L·(d + 1) prefix gates. Defaults are AdapterHub's: prefix length 10 (MLP width 512),
LoRA r = 8, α = 2 on the attention's query and value projections, the adapter d/16 with ReLU after the FFN.
``prefix_tuning`` / ``adapter`` / ``lora`` switch a component off (the paper's UniPELT (AP) is ``lora=False``).

Deviations: the adapter reads the FFN output projection's output before the residual and LayerNorm (AdapterHub's
``SeqBnConfig`` reads the post-LayerNorm sum); on GPT-2 LoRA adapts the fused ``c_attn`` (queries, keys and values);
a gate's bias starts at 0 (AdapterHub: LoRA's gate bias keeps nn.Linear's default draw). A prefix gated to 0 still
takes attention mass (zero keys score 0), as in the paper: the gate scales the prefix, it does not remove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.model_level import ModelLevelConfig
from peftkit.core.registry import register
from peftkit.methods._hybrid import HybridAdapter, Part
from peftkit.methods.bottleneck import FFN_OUTPUT, SeriesAdapter, SeriesAdapterConfig
from peftkit.methods.lora import Lora, LoraConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig

#: the attention's query and value projections (Llama ``q_proj`` / ``v_proj``, BERT ``query`` / ``value``, GPT-2's
#: fused ``c_attn``)
QUERY_VALUE = ["q_proj", "v_proj", "query", "value", "c_attn"]


@dataclass
class UniPELTConfig(ModelLevelConfig):
    """UniPELT (AdapterHub's defaults). ``prefix_tuning``: use the gated prefix; ``prefix_length``: its length P;
    ``prefix_bottleneck_size``: the width of its reparametrising MLP; ``adapter``: use the gated bottleneck adapter;
    ``reduction_factor``: its bottleneck is ⌊d / reduction_factor⌋; ``non_linearity``: its activation σ;
    ``adapter_modules``: where it goes (the FFN output projections); ``lora``: use gated LoRA; ``r``: the rank of LoRA;
    ``alpha``: the scale of LoRA is alpha / r; ``lora_modules``: where LoRA goes (the attention's query and value
    projections); ``dropout``: on every component's input and on the prefix."""

    prefix_tuning: bool = True
    prefix_length: int = 10
    prefix_bottleneck_size: int = 512
    adapter: bool = True
    reduction_factor: float = 16.0
    non_linearity: Literal["relu", "tanh", "gelu", "silu", "sigmoid", "identity"] = "relu"
    adapter_modules: list[str] | str = FFN_OUTPUT
    lora: bool = True
    r: int = 8
    alpha: float = 2.0
    lora_modules: list[str] | str = field(default_factory=lambda: list(QUERY_VALUE))

    def validate(self) -> None:
        super().validate()
        for name in ("prefix_length", "prefix_bottleneck_size", "reduction_factor", "r", "alpha"):
            self.positive(f"UniPELTConfig.{name}", getattr(self, name))
        if not (self.prefix_tuning or self.adapter or self.lora):
            raise PeftkitError("UniPELTConfig: prefix_tuning, adapter and lora are all off; keep at least one")


def _bottleneck(host: Host, reduction_factor: float) -> int:
    m = int(host.d_out // reduction_factor)
    if m < 1:
        raise PeftkitError(f"{host.name!r}: ⌊{host.d_out} / reduction_factor {reduction_factor:g}⌋ = 0; lower "
                           "reduction_factor")
    return m


@register(
    "unipelt",
    config=UniPELTConfig,
    family="hybrid",
    paper="Mao et al., ACL 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning "
          "(arXiv 2110.07577)",
    description="LoRA on q/v + prefix tuning + bottleneck adapter after the FFN, each behind a learned gate "
                "σ(w·x + b) (peftkit's own pieces, assembled)",
    params="prefix + r·(d_in+d_out)+d_in+1 per LoRA layer + 2·m·d+d+1 per adapter layer + L·(d+1) — whole model",
    hosts=(),
    mergeable=False,
    init_is_identity=False,  # the prefix changes the output at init, as prefix tuning's does
    model_level=True,
    lr_scale=0.5,
    head_lr_scale=1.0,
)
class UniPELT(HybridAdapter):
    prefix_gated = True

    @classmethod
    def parts(cls, config: UniPELTConfig) -> list[Part]:
        out = []
        if config.lora:
            out.append(Part("lora", Lora, config.lora_modules, lambda host: LoraConfig(
                r=config.r, alpha=config.alpha, dropout=config.dropout), gated=True))
        if config.adapter:
            out.append(Part("adapter", SeriesAdapter, config.adapter_modules, lambda host: SeriesAdapterConfig(
                bottleneck_size=_bottleneck(host, config.reduction_factor), non_linearity=config.non_linearity,
                dropout=config.dropout), gated=True, gate_reads_output=True))
        return out

    @classmethod
    def prefix_config(cls, config: UniPELTConfig) -> PrefixTuningConfig | None:
        if not config.prefix_tuning:
            return None
        return PrefixTuningConfig(num_virtual_tokens=config.prefix_length,
                                  encoder_hidden_size=config.prefix_bottleneck_size, dropout=config.dropout)
