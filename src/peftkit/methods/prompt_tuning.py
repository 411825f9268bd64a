"""Prompt tuning — Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv 2104.08691).

    forward:  the frozen model runs on [P; E(x)] ∈ R^{B×(n+T)×d} instead of E(x), where P ∈ R^{n×d} is trained and E is
              the model's own input embedding; attention mask [1ₙ; m], token-level labels [-100ₙ; y], token types
              [0ₙ; t], position ids [0..n-1; p + n]. The output has n + T positions (the first n are the prompt's).
    init:     "random": P ~ U(-0.5, 0.5); "vocab": E's rows for n distinct ids drawn from the first 5,000 ids (the
              paper samples the 5,000 most frequent tokens; WordPiece/BPE vocabularies list frequent tokens first —
              an approximation); "text": E's rows for the tokens of ``init_text`` (e.g. the class label words),
              repeated cyclically or truncated to n.
    merge:    none — the prompt is extra input, not a weight change (``merge`` refuses: not mergeable).

Trainable: P — n·d. Defaults: n = 20, "vocab" init (the paper's best setting is n = 100 with class-label init and
Adafactor at lr 0.3 — recalled from the paper, unconfirmed; our CLI's AdamW wants a far larger lr than for LoRA).

Text init: ``init_text`` is tokenised (without special tokens) with the tokenizer in the local folder ``tokenizer``,
by default the model's own folder (``model.config._name_or_path``), once at ``adapt``; the ids are then kept in
``init_token_ids`` (so loading never needs the tokenizer). A caller holding a tokenizer can pass
``init_token_ids=tok(text, add_special_tokens=False).input_ids`` directly.

A sequence classifier reads the first position: with the prompt in front, that is the first virtual token (as in
Hugging Face PEFT). During cached generation the prompt enters the cache at the first step; later steps only move
the mask and positions. Encoder-decoder models are not supported (the prompt would have to reach the encoder that
``generate`` calls directly). Reads and writes Hugging Face PEFT ``PROMPT_TUNING`` files (``prompt_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core import model_level as ml
from peftkit.core.errors import PeftkitError
from peftkit.core.peft_names import FROM_MODEL, alias, inert, names_list, or_default, plain
from peftkit.core.registry import register

VOCAB_POOL = 5000
_PEFT_INIT = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


@dataclass
class PromptTuningConfig(ml.ModelLevelConfig):
    """``num_virtual_tokens`` n; ``init``: ``"random"``, ``"vocab"`` or ``"text"`` (``init_text`` with the local
    ``tokenizer`` folder — default the model's own — or ``init_token_ids``). Accepts Hugging Face PEFT
    ``PromptTuningConfig``'s field names (``prompt_tuning_init`` RANDOM / SAMPLE_VOCAB / TEXT,
    ``prompt_tuning_init_text``, ``tokenizer_name_or_path``; PEFT's default init is RANDOM, peftkit's "vocab")."""

    num_virtual_tokens: int = 20
    init: Literal["random", "vocab", "text"] = "vocab"
    init_text: str | None = None
    init_token_ids: list[int] | None = None
    tokenizer: str | None = None

    peft_type = "PROMPT_TUNING"
    peft_names = {
        **FROM_MODEL,
        "num_virtual_tokens": or_default("num_virtual_tokens"),
        "modules_to_save": alias("modules_to_save", names_list),
        "prompt_tuning_init": alias("init", lambda v: _PEFT_INIT.get(str(plain(v)).upper(), plain(v))),
        "prompt_tuning_init_text": or_default("init_text"),
        "tokenizer_name_or_path": or_default("tokenizer"),
        "tokenizer_kwargs": inert(None, "peftkit tokenises init_text without special tokens; pass init_token_ids "
                                        "to choose the tokens yourself"),
    }

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self.positive(f"{name}.num_virtual_tokens", self.num_virtual_tokens)
        if self.dropout:
            raise PeftkitError(f"{name}.dropout: prompt tuning has no dropout (got {self.dropout})")
        if self.init == "text":
            if not self.init_text and not self.init_token_ids:
                raise PeftkitError(f"{name}.init='text' needs init_text (or init_token_ids)")
        elif self.init_text is not None or self.init_token_ids is not None:
            raise PeftkitError(f"{name}.init_text / init_token_ids are used only with init='text' (init={self.init!r})")
        if self.init_token_ids is not None and any(i < 0 for i in self.init_token_ids):
            raise PeftkitError(f"{name}.init_token_ids must be non-negative token ids")

    def resolve(self, model: Any) -> PromptTuningConfig:
        """``init_text`` tokenised into ``init_token_ids`` (once; idempotent)."""
        if self.init != "text" or self.init_token_ids is not None:
            return self
        folder = self.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not folder:
            raise PeftkitError(f"{type(self).__name__}.tokenizer: the model names no folder to load a tokenizer from; "
                               "give tokenizer=<local folder> or init_token_ids")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise PeftkitError(f"{type(self).__name__}.tokenizer: cannot load a tokenizer from {folder!r} "
                               f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        ids = list(tok(self.init_text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise PeftkitError(f"{type(self).__name__}.init_text {self.init_text!r} tokenises to no tokens")
        return replace(self, init_token_ids=ids)


def input_embedding(model: nn.Module, method: str) -> nn.Module:
    ml.hf_config(model, method)
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None or getattr(emb, "weight", None) is None or "inputs_embeds" not in ml.forward_params(model):
        raise PeftkitError(f"{method} needs a model with get_input_embeddings() whose forward takes inputs_embeds; "
                           f"{type(model).__name__} does not")
    return emb


@register(
    "prompt_tuning",
    config=PromptTuningConfig,
    family="soft-prompt",
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (arXiv 2104.08691)",
    description="n trainable virtual token embeddings prepended to the input (model frozen, embeddings included)",
    params="n·d (for the whole model)",
    hosts=(),
    mergeable=False,
    init_is_identity=False,
    model_level=True,
    hf_peft_type="PROMPT_TUNING",
    lr_scale=15.0,  # a few virtual-token vectors (the paper's large rate)
)
class PromptTuning(ml.ModelAdapter):
    hf_state_key = "prompt"  # Hugging Face PEFT's prompt_embeddings, same (n, d) layout

    def __init__(self, model: nn.Module, config: PromptTuningConfig) -> None:
        super().__init__(model, config)
        weight = input_embedding(model, self.method).weight
        ml.check_room(model, self.method, "num_virtual_tokens", config.num_virtual_tokens)
        self.n = config.num_virtual_tokens
        self.prompt = nn.Parameter(self._init(weight.detach(), config))

    def _init(self, weight: torch.Tensor, config: PromptTuningConfig) -> torch.Tensor:
        vocab, d = weight.shape
        if config.init == "random":
            return torch.empty(self.n, d, dtype=torch.float32).uniform_(-0.5, 0.5).to(weight.device)  # CPU draw
        if config.init == "vocab":
            pool = min(VOCAB_POOL, vocab)
            ids = torch.randperm(pool)[:self.n] if self.n <= pool else torch.randint(0, pool, (self.n,))
        else:
            ids = torch.tensor(config.init_token_ids, dtype=torch.long)
            if int(ids.max()) >= vocab:
                raise PeftkitError(f"{type(config).__name__}.init_token_ids: id {int(ids.max())} is outside the "
                                   f"model's vocabulary of {vocab}")
            ids = ids.repeat((self.n + len(ids) - 1) // len(ids))[:self.n]
        return weight[ids.to(weight.device)].float().clone()

    @property
    def added_positions(self) -> int:
        return self.n

    @classmethod
    def expected_params(cls, model: nn.Module, config: Any) -> int:
        return config.num_virtual_tokens * input_embedding(model, cls.method).weight.shape[1]

    def rewrite(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        key, cache = ml.pop_cache(inputs)
        if key is not None:
            inputs[key] = cache
        batch, length, device = ml.batch_and_length(inputs)
        if ml.cache_length(cache) > 0:  # a later step of cached generation: the prompt is in the cache already
            if ml.cache_tag(cache) != self.n:
                raise PeftkitError(f"{self.method}: the model was given a non-empty cache that does not start with "
                                   "this adapter's prompt; start from an empty cache (or none)")
            ml.prepend_in_past(inputs, self.n, ml.cache_length(cache), batch, length, device)
            return inputs
        ml.check_length(model, self.method, self.n, length)
        ids, embeds = inputs.pop("input_ids", None), inputs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        elif ids is not None:
            raise PeftkitError("pass input_ids or inputs_embeds, not both")
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        ml.prepend_in_sequence(inputs, self.n, batch, length, device)
        if cache is not None:
            ml.tag_cache(cache, self.n)
        return inputs

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> PromptTuningConfig:
        # the prompt itself comes from the file, so its init does not matter here
        return PromptTuningConfig(num_virtual_tokens=int(hf_config["num_virtual_tokens"]), init="random")

    def to_hf_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = ml.hf_config(model, self.method)
        return {"num_virtual_tokens": self.n, "token_dim": self.prompt.shape[1], "num_transformer_submodules": 1,
                "num_attention_heads": cfg.num_attention_heads, "num_layers": cfg.num_hidden_layers,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.prompt.shape[1]}"
