"""Compacter — Mahabadi, Henderson & Ruder, NeurIPS 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers" (arXiv 2106.04647), as AdapterHub's ``adapters`` library defines it (``CompacterPlusPlusConfig`` /
``CompacterConfig``, ``methods/modeling.py``: ``PHMLayer``).

    forward:  y = h + s·PHM_up(σ(PHM_down(drop(h))))  after the host (h = its output, channel-wise), where a PHM
              layer is z ↦ z·H + b with H = Σ_{i=1..n} A_i ⊗ B_i (n = phm_dim; ops/kronecker.kron_sum);
              A ∈ R^{n×n×n} the rule, shared by every layer and both projections; B_i = L_i·R_i of rank phm_rank
              (down: L_i ∈ R^{(c/n)×r}, R_i ∈ R^{r×(m/n)}; up: m/n and c/n swapped), m = ⌊c / reduction_factor⌋
              rounded down to a multiple of n (at least n)
    init:     A ~ N(0, phm_init_range²) (or U(±phm_init_range)); L, R glorot-normal per i; biases 0. "mam": the up
              projection's R = 0 ⇒ H_up = 0, the base model bit for bit ("phm": every factor glorot-normal, as
              AdapterHub, a small nonzero update at init)
    merge:    none — σ sits between the two projections (mergeable=False)

Trainable per adapted layer: 2·r·(c + m) (+ m + c biases); the rule n³ once for the whole adapter (shared), or 2·n³
per layer with ``shared_phm_rule=False``; without ``factorized_phm_W`` each B_i is a full (c/n)×(m/n) block,
2·c·m/n per layer. The paper's count for Compacter++ (one adapter after each FFN, r = 1, no biases) is 2·L·(c + m)
+ n³. Placement: ``output_adapter`` (after the FFN's output projection) alone is Compacter++ (AdapterHub's
``compacter++``, the default here); ``mh_adapter=True`` adds one after the attention's output projection too —
Compacter with Houlsby's placement (AdapterHub's ``compacter``).

Deviations from AdapterHub: peftkit defaults to ``init="mam"`` (identity at init, as its bottleneck adapters do);
AdapterHub's ``PHMLayer`` draws every factor (``"phm"`` here). ``learn_phm=False``, a shared W and a factorised
rule (AdapterHub options off by default) are not offered. The adapter runs after the host's own output, before the
model's residual and LayerNorm (AdapterHub's ``original_ln_before=True`` reads the post-LayerNorm sum instead). A
bottleneck that is not a multiple of n is rounded down to one (AdapterHub refuses it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core.adapter import Adapter, PlanContext, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register
from peftkit.methods.bottleneck import ACTIVATIONS, FFN_OUTPUT
from peftkit.ops.kronecker import kron_sum, low_rank

#: after the attention: its output projection (Llama/Mistral ``o_proj``, OPT ``out_proj``, GPT-2 ``attn.c_proj``,
#: BERT ``attention.output.dense``, BLOOM / GPT-NeoX ``dense``)
ATTENTION_OUTPUT = (r"(.*\.)?(o_proj|out_proj|attn\.c_proj|attention\.output\.dense|self_attention\.dense"
                    r"|attention\.dense)")


@dataclass
class CompacterConfig(AdapterConfig):
    """Compacter (AdapterHub's field names). ``reduction_factor``: the bottleneck is m = ⌊c / reduction_factor⌋ of
    the c adapted channels; ``non_linearity``: the activation σ; ``phm_dim``: n, which must divide c; ``phm_rank``:
    the rank r of each B_i; ``factorized_phm_W``: each B_i is L_i·R_i (else a full block); ``shared_phm_rule``: one
    rule A for all layers (else one per projection and layer); ``phm_bias``: a bias on both PHM layers;
    ``phm_c_init``: the rule's draw, "normal" or "uniform"; ``phm_init_range``: its standard deviation (or bound);
    ``scaling``: the output scale s; ``init``: "mam" (the base model at init) or "phm" (AdapterHub's draw);
    ``mh_adapter``: also adapt the attention's output projection (Houlsby's placement: Compacter);
    ``output_adapter``: adapt the FFN's output projection (alone: Compacter++). Both act while ``target_modules`` is
    its default (the FFN output projections)."""

    target_modules: list[str] | str | None = FFN_OUTPUT
    reduction_factor: float = 32.0
    non_linearity: Literal["gelu", "relu", "tanh", "silu", "sigmoid", "identity"] = "gelu"
    phm_dim: int = 4
    phm_rank: int = 1
    factorized_phm_W: bool = True  # noqa: N815 - AdapterHub's name
    shared_phm_rule: bool = True
    phm_bias: bool = True
    phm_c_init: Literal["normal", "uniform"] = "normal"
    phm_init_range: float = 0.0001
    scaling: float = 1.0
    init: Literal["mam", "phm"] = "mam"
    mh_adapter: bool = False
    output_adapter: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("reduction_factor", "phm_dim", "phm_rank", "phm_init_range"):
            self.positive(f"CompacterConfig.{name}", getattr(self, name))
        if self.target_modules == FFN_OUTPUT and not (self.mh_adapter or self.output_adapter):
            raise PeftkitError("CompacterConfig: mh_adapter and output_adapter are both off and target_modules is the "
                               "default; turn one on (output_adapter: Compacter++) or name the modules")

    def resolve(self, model: Any) -> CompacterConfig:
        """``target_modules`` left at its default (the FFN outputs): the modules ``mh_adapter`` / ``output_adapter``
        select (idempotent)."""
        if self.target_modules != FFN_OUTPUT or (self.output_adapter and not self.mh_adapter):
            return self
        parts = ([ATTENTION_OUTPUT] if self.mh_adapter else []) + ([FFN_OUTPUT] if self.output_adapter else [])
        return dataclasses.replace(self, target_modules="|".join(f"(?:{p})" for p in parts))


def _shape(host: Host, config: CompacterConfig) -> tuple[int, int, int]:
    """(c, m, n) with the divisibility the Kronecker blocks need, or a clear error."""
    c, n = host.d_out, config.phm_dim
    m = max(n, int(c // config.reduction_factor) // n * n)
    if c % n:
        raise PeftkitError(f"compacter on {host.name!r}: its c = {c} output channels are not a multiple of "
                           f"phm_dim = {n}; choose a phm_dim that divides {c}")
    return c, m, n


@register(
    "compacter",
    config=CompacterConfig,
    family="adapter",
    paper="Mahabadi et al., NeurIPS 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (arXiv 2106.04647)",
    description="bottleneck adapter after the host whose projections are sums of Kronecker products Σ A_i ⊗ B_i: "
                "rule A shared by all layers, low-rank B_i (PHM layers); Compacter++ placement by default",
    params="2·r·(c + m) + (c + m) biases per layer, m = c / reduction_factor; + n³ shared rule once",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding"),
    mergeable=False,
    lr_scale=1.5,  # the paper trains Compacter at 3e-3, a larger step than LoRA's
)
class Compacter(Adapter):
    uses_context = True
    additive = False  # reads the host output
    output_only = True  # ... and only the output: it stacks on whatever output it is given

    def __init__(self, host: Host, config: CompacterConfig, context: PlanContext | None = None) -> None:
        context = self.require_context(context)
        super().__init__(host, config, context)
        c, m, n = _shape(host, config)
        self.c, self.m, self.n, self.r = c, m, n, config.phm_rank
        self.act, self.s = config.non_linearity, float(config.scaling)
        dev = host.weight.device
        if config.shared_phm_rule:
            context.shared.parameter("phm_rule", lambda: self._rule(dev))
        else:
            self.phm_rule_down = nn.Parameter(self._rule(dev))
            self.phm_rule_up = nn.Parameter(self._rule(dev))
        for pos, (a, b) in (("down", (c, m)), ("up", (m, c))):
            if config.factorized_phm_W:
                left = nn.Parameter(self._glorot(n, a // n, self.r, dev))
                right = self._glorot(n, self.r, b // n, dev)
                if pos == "up" and config.init == "mam":
                    right.zero_()
                setattr(self, f"W_{pos}_left", left)
                setattr(self, f"W_{pos}_right", nn.Parameter(right))
            else:
                block = self._glorot(n, a // n, b // n, dev)
                if pos == "up" and config.init == "mam":
                    block.zero_()
                setattr(self, f"W_{pos}", nn.Parameter(block))
            if config.phm_bias:
                setattr(self, f"b_{pos}", nn.Parameter(torch.zeros(b, device=dev)))
        self.dropout = make_dropout(config.dropout)

    def _rule(self, dev: torch.device) -> torch.Tensor:
        cfg, n = self.config, self.config.phm_dim
        t = torch.empty(n, n, n, device=dev)
        with torch.no_grad():
            if cfg.phm_c_init == "normal":
                return t.normal_(0.0, cfg.phm_init_range)
            return t.uniform_(-cfg.phm_init_range, cfg.phm_init_range)

    @staticmethod
    def _glorot(n: int, a: int, b: int, dev: torch.device) -> torch.Tensor:
        t = torch.empty(n, a, b, device=dev)
        with torch.no_grad():
            for i in range(n):
                nn.init.xavier_normal_(t[i])
        return t

    def rule(self, pos: str) -> torch.Tensor:
        """The rule A (n, n, n) of the ``"down"`` or ``"up"`` projection (the shared one unless configured apart)."""
        if self.config.shared_phm_rule:
            return self.shared.phm_rule
        return getattr(self, f"phm_rule_{pos}")

    def phm_weight(self, pos: str) -> torch.Tensor:
        """H = Σ A_i ⊗ B_i of the ``"down"`` (c, m) or ``"up"`` (m, c) projection: z ↦ z·H (+ b)."""
        blocks = (low_rank(getattr(self, f"W_{pos}_left"), getattr(self, f"W_{pos}_right"))
                  if self.config.factorized_phm_W else getattr(self, f"W_{pos}"))
        return kron_sum(self.rule(pos).float(), blocks.float())

    def _phm(self, z: torch.Tensor, pos: str) -> torch.Tensor:
        out = self.host.project_out(z, self.phm_weight(pos).t())
        b = getattr(self, f"b_{pos}", None)
        if b is None:
            return out
        return out + (b.float().view(-1, *[1] * (out.dim() - 2)) if self.host.is_conv else b.float())

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = ACTIVATIONS[self.act](self._phm(self.dropout(base_out).float(), "down"))
        out = self._phm(h, "up")
        return out * self.s if self.s != 1.0 else out

    @classmethod
    def expected_params(cls, host: Host, config: CompacterConfig) -> int:
        c, m, n = _shape(host, config)
        per = 2 * config.phm_rank * (c + m) if config.factorized_phm_W else 2 * c * m // n
        return per + (c + m if config.phm_bias else 0) + (0 if config.shared_phm_rule else 2 * n ** 3)

    @classmethod
    def shared_params(cls, config: CompacterConfig, hosts: list[Host]) -> int:
        return config.phm_dim ** 3 if config.shared_phm_rule and hosts else 0
