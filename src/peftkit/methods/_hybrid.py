"""What UniPELT (methods/unipelt.py) and MAM (methods/mam.py) are built from: existing pieces put together, their
maths not copied.

A hybrid adapter is a model-level adapter (one per adapter name, see :mod:`peftkit.core.model_level`) because one of
its pieces, prefix tuning, changes the model's call (key/value prefixes through the cache) and the core holds a
model-level piece and layer pieces under one name only this way. It owns

- a :class:`~peftkit.methods.prefix_tuning.PrefixTuning` (the registered method's own class) whose ``rewrite`` it
  delegates to;
- per targeted layer, an adapter of a registered layer method (LoRA, the series or parallel bottleneck adapter),
  built on that layer's :class:`~peftkit.core.host.Host` and run through the adapter protocol from a forward hook
  on the layer: ``y = h + g · adapter.delta(x, h)`` with ``h`` the layer's output;
- optionally a gate per component and layer (UniPELT): ``g = mean_t σ(z_t·wᵀ + b)``, one value per sample, from
  the component's input ``z`` (Mao et al. 2022; AdapterHub's ``use_gating``: w ~ N(0, 0.02²), b = 0 here). A gated
  prefix has its keys and values multiplied by the gate of its attention layer's input, once per sequence (at the
  first forward, when the cache holds only the prefix; generation steps reuse the gated prefix).

The hooks do nothing unless this adapter is the model's active model-level adapter (and remove themselves once it
is deleted), so ``disable``, switching and deletion behave as for every model-level method; nothing merges.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core import model_level as ml
from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.layer import AdaptedLayer
from peftkit.core.registry import get as get_method
from peftkit.core.targeting import find_targets
from peftkit.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig


@dataclass(frozen=True)
class Part:
    """One kind of layer component: ``key`` (its name in the state), the registered adapter class, the modules it
    targets, its config on a host, whether it is gated and whether the gate reads the layer's output (a component
    after the layer) or its input."""

    key: str
    adapter: type[Adapter]
    targets: list[str] | str
    config: Callable[[Host], AdapterConfig]
    gated: bool = False
    gate_reads_output: bool = False


class Gate(nn.Module):
    """g(z) = mean over positions of σ(z·wᵀ + b): (B, 1, …, 1), one value per sample, computed in fp32."""

    def __init__(self, d: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(d, 1, device=device)
        with torch.no_grad():
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(z.float(), self.gate.weight.float(), self.gate.bias.float()))
        return g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True) if g.dim() > 2 else g


class LayerPart(nn.Module):
    """One component on one layer; :meth:`hook` is that layer's forward hook."""

    def __init__(self, adapter: Adapter, gate: Gate | None, gate_reads_output: bool, owner: HybridAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.gate = gate
        self.gate_reads_output = gate_reads_output
        object.__setattr__(self, "owner", owner)  # a plain attribute: no module cycle

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> Any:
        if not self.owner.live():
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        d = self.adapter.delta(x, output)
        if self.gate is not None:
            d = d * self.gate(output if self.gate_reads_output else x)
        return output + d.to(output.dtype)


class PrefixGate(nn.Module):
    """The gate of one attention layer's prefix; :meth:`hook` is that attention module's forward pre-hook."""

    def __init__(self, attn: nn.Module, index: int, hidden: int, owner: HybridAdapter) -> None:
        super().__init__()
        self.gate = Gate(hidden)
        self.index = index
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "signature", inspect.signature(attn.forward))

    def hook(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.owner.live():
            return None
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        cache = next((bound[k] for k in ml.CACHE_ARGS if bound.get(k) is not None), None)
        prefix = self.owner.prefix
        if cache is None or ml.cache_tag(cache) != prefix.P:
            raise PeftkitError(f"{self.owner.method}: attention layer {self.index} was called without the prefix's "
                               "key/value cache; this model's attention cannot take a gated prefix")
        layer = cache.layers[self.index]
        if layer.keys.shape[-2] != prefix.P:  # a later step of the sequence: its gated prefix is in the cache
            return None
        g = self.gate(bound["hidden_states"]).view(-1, 1, 1, 1)
        layer.keys = layer.keys * g.to(layer.keys.dtype)
        layer.values = layer.values * g.to(layer.values.dtype)
        return None


def attention_modules(model: nn.Module, method: str, layers: int) -> list[nn.Module]:
    """The attention module of each layer (the first module with a ``layer_idx`` whose forward takes the cache)."""
    found: dict[int, nn.Module] = {}
    for path, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and idx not in found and not path.startswith(ml.CONTAINER) \
                and set(ml.CACHE_ARGS) & set(inspect.signature(m.forward).parameters):
            found[idx] = m
    if sorted(found) != list(range(layers)):
        raise PeftkitError(f"{method}: cannot find one attention module per layer in {type(model).__name__} "
                           f"(found layers {sorted(found)} of {layers}); gate the prefix off (prefix_tuning=False)")
    return [found[i] for i in range(layers)]


class HybridAdapter(ml.ModelAdapter):
    """Base of UniPELT and MAM: subclasses say which :class:`Part` s and which prefix they assemble."""

    prefix_gated: ClassVar[bool] = False

    @classmethod
    def parts(cls, config: Any) -> list[Part]:
        raise NotImplementedError

    @classmethod
    def prefix_config(cls, config: Any) -> PrefixTuningConfig | None:
        raise NotImplementedError

    @classmethod
    def targets(cls, model: nn.Module, config: Any) -> list[tuple[Part, list[tuple[str, nn.Module, Host]]]]:
        """Per part, its (path, module, host) in model order (a layer already adapted by peftkit: its host)."""
        out = []
        for part in cls.parts(config):
            hosts = get_method(part.adapter.method).hosts
            found = []
            for path, module in find_targets(model, AdapterConfig(target_modules=part.targets)):
                host = module.host if isinstance(module, AdaptedLayer) else Host(module, path)
                if host.kind not in hosts:
                    raise PeftkitError(f"{cls.method}: its {part.key} ({part.adapter.method}) does not support "
                                       f"{type(host.module).__name__} layers (module {path!r}); set {part.key}_modules")
                found.append((path, module, host))
            out.append((part, found))
        return out

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        pc = self.prefix_config(config)
        self.prefix = PrefixTuning(model, pc) if pc is not None else None
        self.layer_parts = nn.ModuleDict()
        hooks: list[tuple[nn.Module, Any]] = []
        for part, found in self.targets(model, config):
            mods = nn.ModuleList()
            for _, module, host in found:
                gate = Gate(host.d_out if part.gate_reads_output else host.d_in, host.weight.device) \
                    if part.gated else None
                mods.append(LayerPart(part.adapter(host, part.config(host)), gate, part.gate_reads_output, self))
                hooks.append((module, mods[-1]))
            self.layer_parts[part.key] = mods
        attns: list[nn.Module] = []
        if self.prefix is not None and self.prefix_gated:
            attns = attention_modules(model, self.method, self.prefix.geo.layers)
            self.prefix_gates = nn.ModuleList(PrefixGate(a, i, self.prefix.geo.hidden, self)
                                              for i, a in enumerate(attns))
        object.__setattr__(self, "model", model)  # a plain attribute: to see whether this adapter is active
        for module, lp in hooks:
            module.register_forward_hook(lp.hook, with_kwargs=True)
        for attn, pg in zip(attns, self.prefix_gates if attns else [], strict=True):
            attn.register_forward_pre_hook(pg.hook, with_kwargs=True)

    def live(self) -> bool:
        """Whether this adapter is the model's active model-level adapter now (its hooks do nothing otherwise —
        also after the adapter was deleted, when they remove themselves)."""
        state = ml.live(self.model, self)
        if state is None:
            self._detach()
        return bool(state)

    def _detach(self) -> None:
        mine = {id(m) for m in self.modules()}
        for mod in self.model.modules():
            for hooks, extra in ((mod._forward_hooks, mod._forward_hooks_with_kwargs),
                                 (mod._forward_pre_hooks, mod._forward_pre_hooks_with_kwargs)):
                for k, fn in list(hooks.items()):
                    if id(getattr(fn, "__self__", None)) in mine:
                        del hooks[k]
                        extra.pop(k, None)

    def rewrite(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.prefix.rewrite(model, inputs) if self.prefix is not None else inputs

    @classmethod
    def expected_params(cls, model: nn.Module, config: Any) -> int:
        pc = cls.prefix_config(config)
        total = PrefixTuning.expected_params(model, pc) if pc is not None else 0
        for part, found in cls.targets(model, config):
            for _, _, host in found:
                total += part.adapter.expected_params(host, part.config(host))
                if part.gated:
                    total += (host.d_out if part.gate_reads_output else host.d_in) + 1
        if pc is not None and cls.prefix_gated:
            from peftkit.core.kvprefix import geometry

            g = geometry(model, cls.method)
            total += g.layers * (g.hidden + 1)
        return total

    def extra_repr(self) -> str:
        parts = {k: len(v) for k, v in self.layer_parts.items()}
        return f"method={self.method}, prefix={self.prefix is not None}, layers={parts}"
