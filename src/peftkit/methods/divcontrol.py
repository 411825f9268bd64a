"""DivControl-style SVD components with a soft gate — "DivControl: Knowledge Diversion for Controllable Image
Generation" (2025, arXiv 2507.23620), built on KIND (Xie et al., arXiv 2408.07337): every weight split into its
singular components, shared learngenes always on, condition-specific tailors gated per sample.

    forward:  y = W_c·x + b,  W_c = U_G·diag(σ_G)·V_Gᵀ + U_T·diag(σ_T ⊙ ĝ)·V_Tᵀ,  ĝ = g(c) repeated over each group
              computed as base(x) + ((x·V)⊙(σ⊙ĝ − S))·Uᵀ  (activation path, rank k = min(d_out, d_in))
    init:     U, S, Vᵀ = svd(W) (thin, float64);  σ = S  ⇒ with g ≡ 1, W_c = U·S·Vᵀ = W: the base model exactly
    merge:    at g ≡ 1 (the gate outside a condition block): W ← W + U·diag(σ − S)·Vᵀ

Components are ordered by singular value: the top ⌊k·f⌋ (f = ``learngene_fraction``) are the learngenes G, the rest
the tailors T, split into ``groups`` contiguous groups (sizes differ by at most one); g(c) ∈ R^groups weighs each
group. Trainable: σ_T — k − ⌊k·f⌋ per layer; σ_G too with ``train_learngenes`` (the paper's few-shot setting freezes
the learngenes and trains tailors and / or the gate). U, S, Vᵀ are persistent buffers, as in ``svd`` (CLIP-SVD): the
adapter file holds k·(d_out + d_in + 1) numbers per layer and loading reproduces outputs bit for bit.

The gate of each sample is a row of ``groups`` non-negative weights given with
``with peftkit.condition(model, gates): model(x)`` — e.g. one-hot rows (one tailor group per condition),
or the soft routing g = softmax(MLP(e)) of :class:`TailorGate` from a condition embedding e (an encoded instruction);
a gate tensor that carries gradient trains that network jointly. Outside such a block g ≡ 1 (all tailors on): that
is what ``peftkit train`` trains (σ of the tailors, at the full weight). Unconfirmed (no official code; the spec is
read from the abstracts): how components are assigned to learngenes / groups (here: by singular-value rank,
contiguously); the REPA-style alignment loss of the multi-condition pretraining is not included (it aligns a
condition encoder with a diffusion backbone, outside this layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register


@dataclass
class DivcontrolConfig(AdapterConfig):
    """``learngene_fraction``: share f of the k = min(d_out, d_in) components kept as always-on learngenes (the top
    ⌊k·f⌋); ``groups``: number of tailor groups the gate weighs; ``train_learngenes``: train σ_G as well."""

    learngene_fraction: float = 0.5
    groups: int = 4
    train_learngenes: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.learngene_fraction < 1.0:  # also rejects NaN
            raise PeftkitError(f"DivcontrolConfig.learngene_fraction must be in [0, 1), got {self.learngene_fraction}")
        if self.groups < 1:
            raise PeftkitError(f"DivcontrolConfig.groups must be a positive integer, got {self.groups}")


def split(host: Host, config: DivcontrolConfig) -> tuple[int, int]:
    """(k, number of learngenes) on ``host``; refuses a layer with fewer tailors than groups."""
    k = min(host.d_out, host.d_in)
    n_g = math.floor(k * config.learngene_fraction)
    if k - n_g < config.groups:
        raise PeftkitError(
            f"module {host.name!r}: {k - n_g} tailor components (k = {k}, {n_g} learngenes) cannot fill "
            f"{config.groups} groups; lower learngene_fraction or groups"
        )
    return k, n_g


@register(
    "divcontrol",
    config=DivcontrolConfig,
    family="hybrid",
    paper="DivControl (2025, arXiv 2507.23620); KIND, Xie et al. (arXiv 2408.07337)",
    description="singular components of W: shared learngenes always on, tailor groups weighed per sample by a "
                "soft gate g(c) (peftkit.condition); trains the tailors' singular values",
    params="k − ⌊k·f⌋ (+ ⌊k·f⌋ with train_learngenes), k = min(d_out, d_in)",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding"),
    lr_scale=5.0,
)
class Divcontrol(Adapter):
    uses_condition = True

    def __init__(self, host: Host, config: DivcontrolConfig) -> None:
        super().__init__(host, config)
        k, n_g = split(host, config)
        w = host.weight
        dt = w.dtype if w.is_floating_point() else torch.float32
        u, s, vh = torch.linalg.svd(host.weight_2d().detach().double(), full_matrices=False)
        self.register_buffer("U", u.to(w.device, dt).contiguous())
        self.register_buffer("S", s.to(w.device, dt))
        self.register_buffer("Vh", vh.to(w.device, dt).contiguous())
        # group of each tailor component: contiguous groups over the tailors, sizes differing by at most one
        self.register_buffer("group", torch.arange(k - n_g, device=w.device) * config.groups // (k - n_g),
                             persistent=False)
        self.n_g, self.groups = n_g, config.groups
        self.sigma_tailors = nn.Parameter(self.S[n_g:].clone())
        if config.train_learngenes:
            self.sigma_learngenes = nn.Parameter(self.S[:n_g].clone())
        self.dropout = make_dropout(config.dropout)

    def _sigma_g(self) -> torch.Tensor:
        return self.sigma_learngenes if self.config.train_learngenes else self.S[:self.n_g]

    def check_condition(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.shape[1] != self.groups or not ids.is_floating_point():
            raise PeftkitError(
                f"divcontrol gates must be float rows of {self.groups} group weights, one per sample, got {ids.dtype} "
                f"of shape {tuple(ids.shape)}"
            )
        g = ids.detach()
        bad = ~(torch.isfinite(g) & (g >= 0)).all(dim=1)
        if bool(bad.any()):
            raise PeftkitError(
                f"divcontrol gates must be finite and non-negative; sample(s) {bad.nonzero().flatten().tolist()[:8]} "
                f"are not"
            )

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        host = self.host
        xd = self.dropout(x).to(self.S.dtype) if x.is_floating_point() else x
        h = host.project_in(xd, self.Vh)
        if condition is None:  # g ≡ 1
            w = torch.cat([self._sigma_g(), self.sigma_tailors]) - self.S
            return host.project_out(h * host.out_view(w), self.U)
        gk = condition.to(self.S.dtype).index_select(1, self.group)  # (B, k_T): each component's group weight
        sig_g = self._sigma_g().expand(gk.shape[0], self.n_g)
        w = torch.cat([sig_g, self.sigma_tailors * gk], dim=1) - self.S
        return host.project_out(h * host.sample_view(w, h), self.U)

    def delta_weight(self) -> torch.Tensor:
        return (self.U * (torch.cat([self._sigma_g(), self.sigma_tailors]) - self.S)) @ self.Vh

    @classmethod
    def expected_params(cls, host: Host, config: DivcontrolConfig) -> int:
        k, n_g = split(host, config)
        return k if config.train_learngenes else k - n_g


class TailorGate(nn.Module):
    """The soft gate g = softmax(MLP(e)) over ``groups`` tailor groups from a condition embedding e ∈ R^d_in (e.g.
    the encoded instruction): Linear(d_in, hidden) → GELU → Linear(hidden, groups) → softmax. Its output, passed to
    ``peftkit.condition``, keeps its gradient: train it with the adapter (add its parameters to the optimiser)."""

    def __init__(self, d_in: int, groups: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, groups))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(e), dim=-1)
