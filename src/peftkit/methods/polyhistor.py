"""Polyhistor-Lite — Liu, Ma, Wei, Kira 2022, "Polyhistor: Parameter-Efficient Multi-Task Adaptation for Dense Vision
Tasks" (NeurIPS 2022, arXiv 2210.03265): bottleneck adapters whose weights come from decomposed hypernetworks shared
by all tasks and layers, stretched to every layer width by per-layer Kronecker scaling kernels.

    forward:  y = h + U_{t,l}·σ(D_{t,l}·drop(h)),  h = W·x + b the host output (width d_l), t the sample's task
              D_{t,l} = (S^D_l ⊗ K^D_t)/√d_l ∈ R^{m_l×d_l},   U_{t,l} = (S^U_l ⊗ K^U_t)/√m_l ∈ R^{d_l×m_l}
              K^D_t = H^D_a(c)·H^D_b(c)/√k ∈ R^{m₀×d₀},  K^U_t = H^U_a(c)·H^U_b(c)/√k ∈ R^{d₀×m₀},  c = z_t ⊕ e_l
    init:     z_t, e_l ~ N(0, 1); H_* linear maps (nn.Linear init) except H^U_b = 0 ⇒ K^U = 0 ⇒ y = h;  S_l = 1
    merge:    none — σ sits between D and U (mergeable=False)

torch.compile: inside a ``condition`` block with several tasks the rows are grouped by task (``torch.unique``, one
bottleneck per task present) — data-dependent shapes, a graph break per adapted layer (``compile_breaks``); outside
such blocks the forward compiles without a break.

d₀ (template width) is the greatest common divisor of the targets' output widths — the smallest stage width when
stages double (Swin: 96, 192, 384, 768) — and every layer's kernels are a_l × a_l with a_l = d_l/d₀; m₀ is the
template bottleneck and m_l = a_l·m₀. Decomposed hypernetworks: each template is the product of two small linear
hypernetworks' outputs (rank k), so they emit (m₀ + d₀)·k numbers instead of m₀·d₀; they and the task embeddings z_t
are held once for the whole adapter (shared by tasks and layers), and e_l (optional) tells layers apart.
Trainable per layer: 2·a_l² (+ e with ``layer_embedding``); once: T·e + 2·(c + 1)·k·(m₀ + d₀) with c = 2e (or e) —
apart from the S_l terms, independent of the layer widths.

The task of each sample is an id in 0..T−1 given with ``with peftkit.condition(model, task_ids): model(x)``; outside
such a block every sample uses ``default_task``. Running every task's stream in one forward ("the backbone runs once
per task") is a stacked batch: repeat the inputs T times and pass the matching ids. ``peftkit train`` trains task 0.

Unconfirmed (no official code found; the spec is read from the abstract and project page): the hypernetworks' form
(here: one linear map each, with bias), the input c = z_t ⊕ e_l, the fan-in normalisations (1/√k, 1/√d_l, 1/√m_l,
chosen so a template starts at a usual weight scale), S_l = 1 at init, σ = GELU, and the adapter reading the host
output (a series adapter after each targeted layer). This is the Lite form (decomposed hypernetworks + scaling
kernels); the full Polyhistor's per-stage hypernetworks are not included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.adapter import Adapter, PlanContext, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register


@dataclass
class PolyhistorConfig(AdapterConfig):
    """``num_tasks`` T; ``default_task``: the task outside a ``peftkit.condition`` block (None: ids required);
    ``template_bottleneck`` m₀; ``hyper_rank`` k of the decomposed hypernetworks; ``embed_dim`` e of the task (and
    layer) embeddings; ``layer_embedding``: condition the templates on the layer too; ``activation`` σ."""

    num_tasks: int = 1
    default_task: int | None = 0
    template_bottleneck: int = 8
    hyper_rank: int = 4
    embed_dim: int = 32
    layer_embedding: bool = True
    activation: Literal["gelu", "relu"] = "gelu"

    def validate(self) -> None:
        super().validate()
        for f in ("num_tasks", "template_bottleneck", "hyper_rank", "embed_dim"):
            self.positive(f"PolyhistorConfig.{f}", getattr(self, f))
        if self.default_task is not None and not 0 <= self.default_task < self.num_tasks:
            raise PeftkitError(
                f"PolyhistorConfig.default_task must be in 0..{self.num_tasks - 1} (or None), got {self.default_task}"
            )


def template_width(hosts: list[Host]) -> int:
    """d₀ = gcd of the output widths of all targeted layers."""
    return math.gcd(*(h.d_out for h in hosts))


def _hyper_shapes(config: PolyhistorConfig, d0: int) -> dict[str, tuple[int, int]]:
    """(out, in) of the four hypernetworks: down template (m₀, d₀) = a·b, up template (d₀, m₀) = a·b."""
    c = config.embed_dim * (2 if config.layer_embedding else 1)
    m0, k = config.template_bottleneck, config.hyper_rank
    return {"hd_a": (m0 * k, c), "hd_b": (k * d0, c), "hu_a": (d0 * k, c), "hu_b": (k * m0, c)}


@register(
    "polyhistor",
    config=PolyhistorConfig,
    family="hybrid",
    paper="Liu, Ma, Wei & Kira 2022, Polyhistor (NeurIPS 2022, arXiv 2210.03265)",
    description="multi-task bottleneck adapters from decomposed hypernetworks (task embedding → low-rank template) "
                "shared by tasks and layers, stretched per layer by Kronecker scaling kernels; task per sample",
    params="2·(d_l/d₀)² (+ e) per layer; once: T·e + 2·(c + 1)·k·(m₀ + d₀)",
    hosts=("linear", "gpt2_conv1d", "embedding"),
    mergeable=False,
    lr_scale=0.25,  # adapter weights from a shared hypernetwork; the fresh head needs the task's rate
    head_lr_scale=1.0,
    compile_breaks=(
        "inside a `peftkit.condition` block with several task ids, the forward groups the rows by task "
        "(torch.unique, then one bottleneck per task present): the number of groups and their sizes depend on "
        "the ids, a graph break per adapted layer; outside such blocks (one default task) it compiles without "
        "a break"
    ),
)
class Polyhistor(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    uses_context = True
    uses_condition = True

    def __init__(self, host: Host, config: PolyhistorConfig, context: PlanContext | None = None) -> None:
        context = self.require_context(context)
        super().__init__(host, config, context)
        d0 = template_width([h for _, h in context.targets])
        self.d0, self.a = d0, host.d_out // d0
        self.m0, self.k = config.template_bottleneck, config.hyper_rank
        w = host.weight
        dev, dt = w.device, (w.dtype if w.is_floating_point() else torch.float32)
        store = self.shared
        # random inits are drawn on the CPU, then moved: after the same torch.manual_seed, the same on every device
        store.parameter("task_embedding", lambda: torch.randn(config.num_tasks, config.embed_dim).to(dev, dt))
        for key, (n_out, n_in) in _hyper_shapes(config, d0).items():
            if f"{key}_weight" in store._parameters:  # built by the first layer
                continue
            hyper = nn.Linear(n_in, n_out).to(dev, dt)  # nn.Linear's init
            if key == "hu_b":  # the up template starts at 0: the adapter starts at the base model
                nn.init.zeros_(hyper.weight)
                nn.init.zeros_(hyper.bias)
            store.parameter(f"{key}_weight", hyper.weight.detach)
            store.parameter(f"{key}_bias", hyper.bias.detach)
        if config.layer_embedding:
            self.layer_embedding = nn.Parameter(torch.randn(config.embed_dim).to(dev, dt))
        self.scale_down = nn.Parameter(torch.ones(self.a, self.a, device=dev, dtype=dt))
        self.scale_up = nn.Parameter(torch.ones(self.a, self.a, device=dev, dtype=dt))
        self.act = F.gelu if config.activation == "gelu" else F.relu
        self.default = config.default_task
        self.dropout = make_dropout(config.dropout)

    def _hyper(self, key: str, c: torch.Tensor) -> torch.Tensor:
        p = self.shared._parameters
        return F.linear(c, p[f"{key}_weight"], p[f"{key}_bias"])

    def weights(self, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D (n, m_l, d_l) and U (n, d_l, m_l) of this layer for the task ids ``tasks`` (n,)."""
        c = self.shared._parameters["task_embedding"].index_select(0, tasks)
        if self.config.layer_embedding:
            c = torch.cat([c, self.layer_embedding.expand(c.shape[0], -1)], dim=1)
        n, m0, d0, k, a = c.shape[0], self.m0, self.d0, self.k, self.a
        kd = self._hyper("hd_a", c).view(n, m0, k) @ self._hyper("hd_b", c).view(n, k, d0) / math.sqrt(k)
        ku = self._hyper("hu_a", c).view(n, d0, k) @ self._hyper("hu_b", c).view(n, k, m0) / math.sqrt(k)
        # Kronecker product S ⊗ K per task: block (i, j) of the result is S[i, j]·K
        down = torch.einsum("ij,npq->nipjq", self.scale_down, kd).reshape(n, a * m0, a * d0)
        up = torch.einsum("ij,npq->nipjq", self.scale_up, ku).reshape(n, a * d0, a * m0)
        return down / math.sqrt(a * d0), up / math.sqrt(a * m0)

    def check_condition(self, ids: torch.Tensor) -> None:
        t = self.config.num_tasks
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise PeftkitError(f"polyhistor task ids must be a 1-D sequence of integers (one per sample), got "
                               f"{ids.dtype} of shape {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= t)
        if bool(bad.any()):
            raise PeftkitError(f"polyhistor task ids {sorted(set(ids[bad].tolist()))} are out of range 0..{t - 1}")

    def _bottleneck(self, h: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(self.dropout(h) @ down.t()) @ up.t()

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = base_out.to(self.scale_down.dtype)
        if condition is None:
            if self.default is None:
                raise PeftkitError(
                    f"polyhistor on {self.host.name!r} needs a task id per sample (default_task is None): run the "
                    f"forward inside `with peftkit.condition(model, task_ids):`"
                )
            down, up = self.weights(torch.tensor([self.default], device=h.device))
            return self._bottleneck(h, down[0], up[0])
        tasks, inverse = torch.unique(condition, return_inverse=True)
        down, up = self.weights(tasks)
        if tasks.numel() == 1:
            return self._bottleneck(h, down[0], up[0])
        out = torch.zeros_like(h)
        for i in range(tasks.numel()):
            rows = (inverse == i).nonzero().flatten()
            out = out.index_copy(0, rows, self._bottleneck(h.index_select(0, rows), down[i], up[i]))
        return out

    @classmethod
    def expected_params(cls, host: Host, config: PolyhistorConfig) -> int:
        """The layer embedding only: the kernels' size needs d₀, set by all targets (see :meth:`shared_params`)."""
        return config.embed_dim if config.layer_embedding else 0

    @classmethod
    def shared_params(cls, config: PolyhistorConfig, hosts: list[Host]) -> int:
        d0 = template_width(hosts)
        hyper = sum((n_in + 1) * n_out for n_out, n_in in _hyper_shapes(config, d0).values())
        kernels = sum(2 * (h.d_out // d0) ** 2 for h in hosts)
        return config.num_tasks * config.embed_dim + hyper + kernels
