"""LoReFT — Wu et al., NeurIPS 2024, "ReFT: Representation Finetuning for Language Models" (arXiv 2404.03592), with
its NoReFT and DiReFT variants, configured as AdapterHub's ``LoReftConfig`` / ``NoReftConfig`` / ``DiReftConfig``.

    forward:  at the chosen positions of each chosen layer's output h ∈ R^d (residual stream), per sample:
              Φ(h) = h + Rᵀ(σ(W·h + b) − R·h), R ∈ R^{r×d} orthonormal rows, W ∈ R^{r×d}, b ∈ R^r, σ = identity by
              default; other positions stay exactly as they were. NoReFT: R unconstrained; DiReFT: also no −R·h
    init:     R random orthonormal (pyreft's ``orthogonal_``), W, b as ``nn.Linear``: not the identity (as pyreft)
    merge:    none — Φ edits hidden states at positions, no weight (``merge`` refuses)

Positions (pyreft's "f<p>+l<s>", AdapterHub's ``prefix_positions`` / ``suffix_positions``): the first p and last s
real tokens of each sample, from the call's attention mask (left or right padding; no mask: all real); with both
sides, at most ⌊n/2⌋ each of n tokens (pyreft: no overlap). ``tied_weights``: one (R, W, b) for both sides, else one
per side with positions (AdapterHub also builds an unused suffix unit). Dropout (AdapterHub's default 0.05) acts on
Φ(h), as in both libraries. R: torch's orthogonal "householder" map (``parametrizations.orthogonal``'s pick for
pyreft's d×r weight) on stored reflectors, without trivialisation (no d×d buffer) or ``parametrize`` (unpicklable):
d·r values, the count both libraries report (those on/above the diagonal do not enter R; the signs are a buffer).
Layers: the model's layer list (by ``num_hidden_layers``, or ``layer_module``). Model-level: one active at a time, none
in a mixed batch. ``generate``: cached steps (new tokens) are not intervened on, as pyreft's ``intervene_on_prompt``
(``use_cache=False``: each step is a fresh call, its last s positions move with the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core import model_level as ml
from peftkit.core.errors import PeftkitError
from peftkit.core.registry import register

ACTIVATIONS = {"identity": nn.Identity(), "linear": nn.Identity(), "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu,
               "silu": F.silu, "swish": F.silu, "sigmoid": torch.sigmoid}


@dataclass
class LoReftConfig(ml.ModelLevelConfig):
    """AdapterHub's fields. ``layers``: "all" or layer indices; ``prefix_positions``: p, the first real tokens;
    ``suffix_positions``: s, the last real tokens; ``r``: rank of R and W; ``orthogonality``: the rows of R orthonormal;
    ``tied_weights``: one intervention for prefix and suffix; ``subtract_projection``: the −R·h term;
    ``non_linearity``: σ on W·h + b (None: identity); ``layer_module``: (peftkit's) the layer list's path."""

    layers: Literal["all"] | list[int] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None
    layer_module: str | None = None

    def validate(self) -> None:
        super().validate()
        name, p, s = type(self).__name__, self.prefix_positions, self.suffix_positions
        self.positive(f"{name}.r", self.r)
        if p < 0 or s < 0 or p + s == 0:
            raise PeftkitError(f"{name}: prefix_positions, suffix_positions must be >= 0, not both 0 (got {p}, {s})")
        layers = [] if self.layers == "all" else self.layers
        if self.layers != "all" and (not layers or min(layers) < 0 or len(set(layers)) < len(layers)):
            raise PeftkitError(f"{name}.layers: 'all' or distinct layer indices >= 0 (got {self.layers})")
        if self.non_linearity is not None and self.non_linearity not in ACTIVATIONS:
            raise PeftkitError(f"{name}.non_linearity {self.non_linearity!r}: None or one of {', '.join(ACTIVATIONS)}")


@dataclass
class NoReftConfig(LoReftConfig):
    """LoReFT without the orthogonality constraint (AdapterHub's ``NoReftConfig``)."""
    orthogonality: bool = False


@dataclass
class DiReftConfig(LoReftConfig):
    """LoReFT without the orthogonality constraint and without the −R·h term (AdapterHub's ``DiReftConfig``)."""
    orthogonality: bool = False
    subtract_projection: bool = False


def orthonormal_rows(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R (r×d, orthonormal rows) from Householder reflectors ``x`` (r×d, those below the diagonal of xᵀ) and the
    column signs — torch's orthogonal "householder" map."""
    a = x.t().tril(-1)
    tau = 2.0 / (1.0 + (a * a).sum(0))
    return (torch.linalg.householder_product(a, tau) * signs).t()


@torch.no_grad()
def reflectors(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`orthonormal_rows`: (reflectors, signs) of an r×d frame with orthonormal rows."""
    a, tau = torch.geqrf(frame.t())
    a.diagonal().sign_()
    a.diagonal()[tau == 0.0] *= -1
    return a.t().contiguous(), a.diagonal().clone()


class Intervention(nn.Module):
    """One (R, W, b): ``forward(h)`` = Φ(h) on every row of h (…, d)."""

    def __init__(self, d: int, config: LoReftConfig, device: Any) -> None:
        super().__init__()
        self.source = nn.Linear(d, config.r, device=device)  # W, b
        if config.orthogonality:  # reflectors of a random orthonormal frame, and their signs
            x, signs = reflectors(nn.init.orthogonal_(torch.empty(config.r, d, device=device)))
            self.register_buffer("signs", signs)
        else:  # AdapterHub's unconstrained projection: an nn.Linear(d, r) weight
            x = nn.Linear(d, config.r, bias=False, device=device).weight.detach()
        self.rotate = nn.Parameter(x.clone())
        self.subtract = config.subtract_projection
        self.act = config.non_linearity or "identity"  # a name: the module stays picklable
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def frame(self) -> torch.Tensor:  # R (r×d)
        return orthonormal_rows(self.rotate, self.signs) if hasattr(self, "signs") else self.rotate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.frame()
        z = ACTIVATIONS[self.act](self.source(h))
        if self.subtract:
            z = z - h @ R.t()
        return self.dropout(h + z @ R)


class _Site(nn.Module):
    """The interventions of one layer; :meth:`hook` is that layer's forward hook."""

    def __init__(self, d: int, config: LoReftConfig, sides: int, device: Any, owner: LoReft) -> None:
        super().__init__()
        self.units = nn.ModuleList(Intervention(d, config, device) for _ in range(sides))
        object.__setattr__(self, "owner", owner)  # plain attribute: no module cycle

    def hook(self, layer: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """The layer output h with Φ at the positions the call chose (1 prefix, 2 suffix, 0 none); others untouched."""
        chosen = self.owner.chosen
        if not self.owner.live() or chosen is None:
            return None
        h = output if isinstance(output, torch.Tensor) else output[0]
        if h.dim() != 3 or tuple(h.shape[:2]) != tuple(chosen.shape):
            raise PeftkitError(f"{self.owner.method}: a layer output {tuple(h.shape)} does not match the call's "
                               f"{tuple(chosen.shape)}; call the adapted model itself")
        dtype, out = self.units[0].rotate.dtype, h
        for i, unit in enumerate(self.units):
            where = chosen == i + 1 if len(self.units) == 2 else chosen > 0
            out = torch.where(where.unsqueeze(-1), unit(h.to(dtype)).to(h.dtype), out)
        return out if isinstance(output, torch.Tensor) else (out, *output[1:])


def layer_list(model: nn.Module, config: LoReftConfig, method: str) -> list[tuple[str, nn.Module]]:
    """(path, layer) of the chosen layers, in model order."""
    cfg = ml.hf_config(model, method)
    mods = [(p, m) for p, m in model.named_modules() if not p.startswith(ml.CONTAINER)]  # not our own lists
    if config.layer_module is not None:
        found = [(p, m) for p, m in mods if p == config.layer_module or p.endswith("." + config.layer_module)]
        what = f"layer_module={config.layer_module!r}"
    else:
        n = getattr(cfg, "num_hidden_layers", None)
        found = [(p, m) for p, m in mods if isinstance(m, nn.ModuleList) and len(m) == n]
        what = f"a module list of num_hidden_layers={n} layers"
    lists = [(p, m) for p, m in found if isinstance(m, nn.ModuleList | nn.Sequential)]
    if len(lists) != 1:
        raise PeftkitError(f"{method}: {type(model).__name__} has {len(lists)} layer lists matching {what} "
                           f"({', '.join(p for p, _ in lists) or 'none'}); name one with layer_module=<its path>")
    path, layers = lists[0]
    index = range(len(layers)) if config.layers == "all" else config.layers
    if max(index) >= len(layers):
        raise PeftkitError(f"{method}: layers={config.layers} but {path} has {len(layers)} layers")
    return [(f"{path}.{i}", layers[i]) for i in sorted(index)]


def sides(config: LoReftConfig) -> int:
    """Interventions per layer: two for untied prefix and suffix, else one."""
    return 2 if config.prefix_positions > 0 and config.suffix_positions > 0 and not config.tied_weights else 1


def choose(real: torch.Tensor, p: int, s: int) -> torch.Tensor:
    """Per position of ``real`` (B, T bool: a real token, not padding): 1 among the first p real tokens, 2 among the
    last s, else 0 — with both sides at most ⌊n/2⌋ each (n real tokens), with one at most n."""
    rank, n = real.long().cumsum(1) - 1, real.sum(1, keepdim=True)
    cap = n // 2 if p > 0 and s > 0 else n
    first, last = cap.clamp(max=p), cap.clamp(max=s)
    return ((real & (rank < first)).to(torch.int8) + 2 * (real & (rank >= n - last)).to(torch.int8))


_COMMON: dict[str, Any] = dict(
    family="adapter", params="layers·sides·(2·r·d + r) (for the whole model; sides = 2 for untied prefix + suffix)",
    hosts=(), mergeable=False, model_level=True, init_is_identity=False,
    paper="Wu et al., NeurIPS 2024, ReFT: Representation Finetuning for Language Models (arXiv 2404.03592)")


@register("loreft", config=LoReftConfig, **_COMMON,
          description="low-rank edit h + Rᵀ(Wh + b − Rh) (R orthonormal rows) of chosen layers' hidden states at the "
                      "first / last token positions")
class LoReft(ml.ModelAdapter):
    def __init__(self, model: nn.Module, config: LoReftConfig) -> None:
        super().__init__(model, config)
        found = layer_list(model, config, self.method)
        d = ml.hf_config(model, self.method).hidden_size
        self.paths = [p for p, _ in found]
        device = next(model.parameters()).device
        self.sites = nn.ModuleList(_Site(d, config, sides(config), device, self) for _ in found)
        self.chosen: torch.Tensor | None = None  # this call's positions (None: intervene nowhere)
        object.__setattr__(self, "model", model)  # a plain attribute (not a submodule): to see whether it is active
        for (_, layer), site in zip(found, self.sites, strict=True):
            layer.register_forward_hook(site.hook)

    def live(self) -> bool:
        """Whether this adapter is the model's active model-level adapter now (the layer hooks do nothing otherwise —
        also after the adapter was deleted, when they remove themselves)."""
        c = ml.container(self.model)
        if c is None or not any(a is self for a in c.adapters.values()):
            for layer in map(self.model.get_submodule, self.paths):
                for k in [k for k, fn in layer._forward_hooks.items() if getattr(fn, "__self__", None) in self.sites]:
                    del layer._forward_hooks[k]
            return False
        return not c.disabled and any(c.adapters[n] is self for n in c.active if n in c.adapters)

    def rewrite(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Choose this call's positions (the layer hooks apply Φ there); the inputs pass unchanged."""
        batch, length, device = ml.batch_and_length(inputs)
        caches = [inputs[k] for k in ml.CACHE_ARGS if inputs.get(k) is not None]
        if caches and inputs.get("use_cache") is not False and ml.cache_length(caches[0]) > 0:
            self.chosen = None  # a cached generation step: new tokens are not intervened on
            return inputs
        mask = inputs.get("attention_mask")
        if mask is not None and tuple(mask.shape) != (batch, length):
            raise PeftkitError(f"{self.method}: attention_mask {tuple(mask.shape)}; give a ({batch}, {length}) mask")
        real = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.to(device) != 0
        self.chosen = choose(real, self.config.prefix_positions, self.config.suffix_positions)
        return inputs

    @classmethod
    def expected_params(cls, model: nn.Module, config: Any) -> int:
        d = ml.hf_config(model, cls.method).hidden_size
        return len(layer_list(model, config, cls.method)) * sides(config) * (2 * config.r * d + config.r)


@register("noreft", config=NoReftConfig, **_COMMON,
          description="LoReFT with an unconstrained R: h + Rᵀ(Wh + b − Rh) at the first / last token positions")
class NoReft(LoReft):
    pass


@register("direft", config=DiReftConfig, **_COMMON,
          description="LoReFT without orthogonality or the −Rh term: h + Rᵀ(Wh + b) at the first / last token "
                      "positions")
class DiReft(LoReft):
    pass
