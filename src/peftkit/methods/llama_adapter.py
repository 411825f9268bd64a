"""LLaMA-Adapter — Zhang et al., ICLR 2024, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention" (arXiv 2303.16199), in Hugging Face PEFT's form (``peft/tuners/adaption_prompt``, ``ADAPTION_PROMPT``),
whose files it reads and writes.

    forward:  in each of the top L attention layers (``adapter_layers``), with that layer's own frozen projections:
              K_p = P·W_kᵀ, V_p = P·W_vᵀ for the trained prompt P ∈ R^{n×d} (n = ``adapter_len``; grouped key/value
              heads repeated to the query heads), Q the layer's queries of the real tokens (rotary positions applied,
              Llama); per head  A = g · softmax(Q·K_pᵀ/√d_h)  (a softmax over the n prompt positions only, no mask)
              and the attention output gains  o_proj(A·V_p)
    init:     P ~ N(0, 1), gate g = 0 ⇒ the base model (the "zero-init attention")
    merge:    none (extra attention, not a weight change)

Trainable: L·(n·d + 1). Hosts: Hugging Face Llama / Mistral-style models (attention modules with q/k/v/o_proj, the
Llama rotary ``position_embeddings``) and GPT-2 (``c_attn``), as PEFT. ``generate`` works unchanged: the prompt's keys
and values are recomputed from P at every step and never enter the key/value cache.

Following PEFT's code where it differs from the paper: one scalar gate per layer (the paper: one per head); on GPT-2
the prompt attention is added to the attention output after ``c_proj`` without a projection of its own (PEFT's
``o_proj_layer=None`` there); on Llama the query states are recomputed from the hidden states (PEFT's
``llama_compute_query_states``). PEFT's prompt is stored (1, n, d) under ``<attention path>.adaption_prompt``, the gate
(1,) under ``.adaption_gate``; peftkit keeps the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core import model_level as ml
from peftkit.core.errors import PeftkitError
from peftkit.core.peft_names import or_default
from peftkit.core.registry import register


@dataclass
class LlamaAdapterConfig(ml.ModelLevelConfig):
    """LLaMA-Adapter. ``adapter_len``: prompt length n per layer; ``adapter_layers``: the top L attention layers
    adapted; ``attention_module``: the attention submodule's name in a decoder layer (Llama: ``self_attn``, GPT-2:
    ``attn``; None: from the model type, as PEFT). Accepts Hugging Face PEFT ``AdaptionPromptConfig``'s field names
    (``target_modules`` names the attention submodule there)."""

    adapter_len: int = 10
    adapter_layers: int = 30
    attention_module: str | None = None

    peft_type = "ADAPTION_PROMPT"
    peft_names = {"target_modules": or_default("attention_module")}

    def validate(self) -> None:
        super().validate()
        self.positive("LlamaAdapterConfig.adapter_len", self.adapter_len)
        self.positive("LlamaAdapterConfig.adapter_layers", self.adapter_layers)
        if self.dropout:
            raise PeftkitError(f"LlamaAdapterConfig.dropout: LLaMA-Adapter has no dropout (got {self.dropout})")


_DEFAULT_ATTENTION = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


def targets(model: nn.Module, config: LlamaAdapterConfig, method: str) -> list[tuple[str, nn.Module]]:
    """(path, attention module) of the top ``adapter_layers`` decoder layers, in model order."""
    cfg = ml.hf_config(model, method)
    kind = getattr(cfg, "model_type", None)
    name = config.attention_module or _DEFAULT_ATTENTION.get(kind)
    if name is None:
        raise PeftkitError(f"{method}: model type {kind!r} is not supported (Llama, Mistral, GPT-2); for another "
                           "Llama-like model give attention_module=<its attention submodule name>")
    found = [(p, m) for p, m in model.named_modules() if p.rsplit(".", 1)[-1] == name and p.split(".")[-2].isdigit()]
    if not found:
        raise PeftkitError(f"{method}: {type(model).__name__} has no decoder-layer submodule named {name!r}")
    if config.adapter_layers > len(found):
        raise PeftkitError(f"{method}: adapter_layers={config.adapter_layers} exceeds the model's {len(found)} "
                           f"layers; use at most {len(found)}")
    for p, m in found:
        if not (all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) or hasattr(m, "c_attn")):
            raise PeftkitError(f"{method}: {p} ({type(m).__name__}) has neither q/k/v/o_proj nor c_attn projections")
    return found[-config.adapter_layers:]


class _Prompt(nn.Module):
    """One adapted attention layer's prompt and gate; its :meth:`hook` is that attention module's forward hook."""

    def __init__(self, attn: nn.Module, n: int, hidden: int, owner: LlamaAdapter) -> None:
        super().__init__()
        proj = attn.q_proj if hasattr(attn, "q_proj") else attn.c_attn
        dtype = proj.weight.dtype if proj.weight.is_floating_point() else torch.float32
        dev = proj.weight.device
        self.adaption_prompt = nn.Parameter(torch.empty(1, n, hidden, device=dev, dtype=dtype).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=dev, dtype=dtype))
        object.__setattr__(self, "owner", owner)  # plain attributes: no module cycle

    def hook(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not self.owner.live():
            return None
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out, *rest = output
        return (out + self.extra(attn, h, kwargs).to(out.dtype), *rest)

    def extra(self, attn: nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The gated prompt attention added to the attention module's output."""
        cfg = attn.config
        bsz, q_len, _ = h.shape
        heads, hd = cfg.num_attention_heads, attn.head_dim
        p = self.adaption_prompt
        if hasattr(attn, "c_attn"):  # GPT-2: q, k, v from one projection, no rotary, no output projection
            embed = attn.embed_dim
            q = attn.c_attn(h).split(embed, dim=2)[0]
            _, k, v = attn.c_attn(p.to(attn.c_attn.weight.dtype)).split(embed, dim=2)
            kv_heads = heads
            q = q.view(bsz, q_len, heads, hd).transpose(1, 2)
        else:
            q = attn.q_proj(h).view(bsz, q_len, heads, hd).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + torch.cat((-q[..., hd // 2:], q[..., : hd // 2]), dim=-1) * sin
            k = attn.k_proj(p.to(attn.k_proj.weight.dtype))
            v = attn.v_proj(p.to(attn.v_proj.weight.dtype))
            kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        n = p.shape[1]
        k = k.view(1, n, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        v = v.view(1, n, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(hd)
        scores = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (scores @ v.to(scores.dtype)).transpose(1, 2).reshape(bsz, q_len, -1)
        return attn.o_proj(out.to(attn.o_proj.weight.dtype)) if hasattr(attn, "o_proj") else out


@register(
    "llama_adapter",
    config=LlamaAdapterConfig,
    family="soft-prompt",
    paper="Zhang et al., ICLR 2024, LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention "
          "(arXiv 2303.16199)",
    description="learned prompts attended by the real tokens' queries in the top L attention layers, through a "
                "zero-initialised gate",
    params="L·(n·d + 1) (for the whole model)",
    hosts=(),
    mergeable=False,
    model_level=True,
    hf_peft_type="ADAPTION_PROMPT",
)
class LlamaAdapter(ml.ModelAdapter):
    def __init__(self, model: nn.Module, config: LlamaAdapterConfig) -> None:
        super().__init__(model, config)
        found = targets(model, config, self.method)
        hidden = ml.hf_config(model, self.method).hidden_size
        self.paths = [p for p, _ in found]
        self.prompts = nn.ModuleList(_Prompt(m, config.adapter_len, hidden, self) for _, m in found)
        object.__setattr__(self, "model", model)  # a plain attribute (not a submodule): to see whether it is active
        for (_, attn), prompt in zip(found, self.prompts, strict=True):
            attn.register_forward_hook(prompt.hook, with_kwargs=True)

    def live(self) -> bool:
        """Whether this adapter is the model's active model-level adapter now (the attention hooks do nothing
        otherwise — also after the adapter was deleted, when they remove themselves)."""
        state = ml.live(self.model, self)
        if state is None:
            self._detach()
        return bool(state)

    def _detach(self) -> None:
        for path in self.paths:
            attn = self.model.get_submodule(path)
            for k, fn in list(attn._forward_hooks.items()):
                if getattr(fn, "__self__", None) in list(self.prompts):
                    del attn._forward_hooks[k]
                    attn._forward_hooks_with_kwargs.pop(k, None)

    def rewrite(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs  # the work happens in the attention hooks

    @classmethod
    def expected_params(cls, model: nn.Module, config: Any) -> int:
        hidden = ml.hf_config(model, cls.method).hidden_size
        return len(targets(model, config, cls.method)) * (config.adapter_len * hidden + 1)

    # -- Hugging Face PEFT: ADAPTION_PROMPT, <attention path>.adaption_prompt (1, n, d) and .adaption_gate (1,) ----
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LlamaAdapterConfig:
        return LlamaAdapterConfig(adapter_len=int(hf_config["adapter_len"]),
                                  adapter_layers=int(hf_config["adapter_layers"]),
                                  attention_module=hf_config.get("target_modules"))

    def to_hf_config(self, model: nn.Module) -> dict[str, Any]:
        name = self.paths[0].rsplit(".", 1)[-1]
        return {"adapter_len": self.config.adapter_len, "adapter_layers": self.config.adapter_layers,
                "target_modules": name}

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, prompt in zip(self.paths, self.prompts, strict=True):
            out[f"base_model.model.{path}.adaption_prompt"] = prompt.adaption_prompt.detach().contiguous()
            out[f"base_model.model.{path}.adaption_gate"] = prompt.adaption_gate.detach().contiguous()
        return out

    @classmethod
    def hf_state(cls, model: nn.Module, config: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        paths = [p for p, _ in targets(model, config, cls.method)]
        hidden = ml.hf_config(model, cls.method).hidden_size
        out = {}
        for i, path in enumerate(paths):
            for name, shape in (("adaption_prompt", (1, config.adapter_len, hidden)), ("adaption_gate", (1,))):
                key = next((k for k in (f"base_model.model.{path}.{name}", f"{path}.{name}") if k in tensors), None)
                if key is None:
                    raise PeftkitError(f"tensor 'base_model.model.{path}.{name}' is missing from the file")
                t = tensors.pop(key)
                if tuple(t.shape) != shape:
                    raise PeftkitError(f"tensor {key!r} has shape {tuple(t.shape)} but {shape} fits this model")
                out[f"prompts.{i}.{name}"] = t
        left = [k for k in tensors if k.endswith((".adaption_prompt", ".adaption_gate"))]
        if left:
            raise PeftkitError(f"tensor {left[0]!r} has no place in this model's top {config.adapter_layers} layers")
        return out
