"""Tiny host models for the conformance matrix (and the other test folders, through ``tests/conftest.py``).

Each :class:`TinyModel` builds a seeded, deterministic model (``build()``; ``build(wide=True)`` gives the same module
names with different widths), a seeded input, the generic target list, and the host kinds those targets are.
:data:`METHOD_OVERRIDES` is the one hook for methods that need extra config fields in the matrix; keep it empty
unless a method cannot run with its defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Extra config fields per method name, merged into the generic config of the matrix, e.g. {"kron": {"factor": 4}}.
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    # the tiny models have one layer per module type: MoS then needs r − r_p ≤ (r_e − r_p)·1
    "mos": {"r": 4, "r_e": 4, "r_p": 2, "l": 2},
    # MTLoRA: the official r = 64 exceeds the tiny layers' min(d_in, d_out) (a rank above it is refused)
    "mtlora": {"r": 8},
    # RandLoRA: likewise its default basis rank r = 32 (N = ⌈m/r⌉ bases; r > m = min(d_in, d_out) adds nothing)
    "randlora": {"r": 16},
    # L4Q: several (Δ, β) groups per row (and a partial last group on conv2d's d_in = 27)
    "l4q": {"group_size": 8},
    # QWHA: the budget p = r·(d_in + d_out) must stay below d_out·d_in on the 16-wide layers (r = 8 fills them)
    "qwha": {"r": 2, "group_size": 8},
    # LoCA: n = 32 coefficients fit every tiny layer's d_out·d_in spectrum (the default 1000 does not)
    "loca": {"n": 32},
    # FourierFT: likewise n = 32 frequencies (the default 1000 exceeds the tiny layers' d_out·d_in spectra)
    "fourierft": {"n": 32},
    # VB-LoRA: bank vectors of length 8 divide every tiny Linear / Conv1D width (the default 256 divides none)
    "vblora": {"num_vectors": 16, "vector_length": 8},
    # conditional SSF: several conditions, the matrix's plain forwards use the default one (not row 0)
    "conditional_ssf": {"num_conditions": 3, "default_condition": 1},
    # ExPLoRA: the tiny models have no numbered blocks to unfreeze (tests/methods/test_explora.py covers that part);
    # their norms are still unfrozen (saved copies next to the LoRA layers)
    "explora": {"unfreeze_layers": []},
    # SketchTune: 4-bit tables cover the ≤ 16-weight groups of the 16-wide layers exactly (no sketching error to see);
    # 2 bits in 2 groups per row sketch every tiny layer lossily (conv2d's conv1, d_in = 27, in one group)
    "sketchtune": {"bits": 2, "groups_per_row": 2},
    # model-level methods on the tiny GPT-2 (16 positions, 6-token inputs): 4 virtual tokens, a small prefix MLP
    "prompt_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 8},
    "ptuning_v2": {"num_virtual_tokens": 4},
    # LLaMA-Adapter: the paper's top 30 layers do not exist in the one-layer GPT-2
    "llama_adapter": {"adapter_len": 4, "adapter_layers": 1},
    # ReFT: rank 2, prefix and suffix (two interventions per layer) on the 6-token inputs
    "loreft": {"r": 2, "prefix_positions": 2, "suffix_positions": 2},
    "noreft": {"r": 2, "prefix_positions": 2, "suffix_positions": 2},
    "direft": {"r": 2, "prefix_positions": 2, "suffix_positions": 2, "tied_weights": True},
    # Compacter: m = c / reduction_factor and c must be multiples of phm_dim on the 16-wide layers (32 / 4 give m = 0)
    "compacter": {"reduction_factor": 4.0, "phm_dim": 2},
    # UniPELT / MAM: prefixes as prefix tuning's (4 tokens, a small MLP); adapters d/4 on the 16-wide GPT-2
    "unipelt": {"prefix_length": 4, "prefix_bottleneck_size": 8, "reduction_factor": 4.0},
    "mam": {"prefix_length": 4, "prefix_bottleneck_size": 8, "reduction_factor": 4.0},
    # AdaLoRA: the tiny layers are 16 wide (init_r 12 fits); a total_step so the allocator could run
    "adalora": {"init_r": 6, "target_r": 4, "total_step": 20},
    # trainable tokens: half of the tiny vocabulary (40 ids), so the random inputs hit chosen and unchosen rows
    "trainable_tokens": {"target_modules": ["emb"], "token_indices": list(range(0, 40, 2))},
    # TriAdaptLoRA as a saved adapter records it after two growths: three blocks on every matrix module
    "triadaptlora": {"block_ranks": {p: [1, 2, 2] for p in (
        "fc1", "fc2", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2", "conv1", "conv2", "emb",
        "h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj")}},
}
# Extra config fields per (method name, model name), applied after METHOD_OVERRIDES.
METHOD_MODEL_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("sketchtune", "conv2d"): {"overrides": {"conv1": {"groups_per_row": 1}}},
    # the series adapter before the host (default: after it) on Linear, Conv2d and GPT-2 Conv1D hosts
    ("series_adapter", "block"): {"placement": "mh_adapter"},
    ("series_adapter", "conv2d"): {"placement": "mh_adapter"},
    ("series_adapter", "gpt2"): {"placement": "mh_adapter"},
    # IA3 input scaling (feedforward modules) next to output scaling; conv layers with 3-tap / 3×3 kernels
    ("ia3", "block"): {"feedforward_modules": ["fc2"]},
    ("ia3", "conv1d"): {"feedforward_modules": ["conv2"]},
    ("ia3", "conv2d"): {"feedforward_modules": ["conv1"]},
    ("ia3", "conv3d"): {"feedforward_modules": ["conv1"]},
    ("ia3", "gpt2"): {"feedforward_modules": ["c_proj"]},
}


class MLP(nn.Module):
    """(B, d) -> (B, n_out); fc1/fc2 are the targets, ``head`` is a classifier (modules_to_save in the matrix)."""

    def __init__(self, d: int = 16, hidden: int = 32, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(x))))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class NormFeedForward(nn.Module):
    """LayerNorm → Linear ``up`` → GELU → Linear ``down`` on (N, 16) rows (seeded): the inputs of both Linears are
    outputs their producers can rebuild (the saved-input mechanism keeps no copy of them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.ln(x))))


class Block(nn.Module):
    """A pre-norm transformer block on batch-first (B, T, d) input."""

    def __init__(self, d: int = 16, ff: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = FeedForward(d, ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvNet1d(nn.Module):
    def __init__(self, c_in: int = 4, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c, 3, padding=1)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


class ConvNet2d(nn.Module):
    def __init__(self, c_in: int = 3, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


class ConvNet3d(nn.Module):
    def __init__(self, c_in: int = 2, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c, 3, padding=1)
        self.conv2 = nn.Conv3d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


class EmbeddingModel(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.emb(ids)))


class NormNet(nn.Module):
    """(B, T, 16) -> (B, n_out) through the three kinds of norm host: ``ln`` (torch LayerNorm, scale and shift),
    ``rms`` (torch RMSNorm) and ``ln_f`` (transformers' LlamaRMSNorm); non-trivial γ, β; ``head`` is a classifier."""

    def __init__(self, d: int = 16, n_out: int = 4) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.fc = nn.Linear(16, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)
        self.ln_f = LlamaRMSNorm(d)
        self.head = nn.Linear(d, n_out)
        with torch.no_grad():
            for norm in (self.ln, self.rms, self.ln_f):
                norm.weight.add_(0.2 * torch.randn(d))
            self.ln.bias.add_(0.2 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.fc(x))
        h = h + torch.tanh(self.rms(h))
        return self.head(self.ln_f(h)).mean(1)


def tiny_gpt2(n_embd: int = 16) -> nn.Module:
    """A real Hugging Face GPT-2 (one layer) whose projections are transformers' ``Conv1D``."""
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=n_embd, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "eager"
    return GPT2Model(cfg)


def tiny_llama(seed: int = 0, hidden: int = 32) -> nn.Module:
    """A seeded Hugging Face ``LlamaForCausalLM``: 2 layers, 4 query / 2 key-value heads (grouped-query attention,
    rotary positions), vocabulary 50, 64 positions, no end-of-sequence token (generation runs its full length);
    eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2) -> nn.Module:
    """A seeded Hugging Face ``BertForSequenceClassification``: 2 layers, 4 heads, hidden 32, vocabulary 50,
    32 absolute positions, dropout off; eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


@dataclass(frozen=True)
class TinyModel:
    name: str
    factory: Callable[[bool], nn.Module]  # wide -> model
    make_input: Callable[[torch.Generator, int], torch.Tensor]  # (generator, batch) -> input
    targets: list[str]
    adapted: list[str]  # full names of the modules the targets select
    hosts: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # generic config fields (e.g. modules_to_save)
    output: Callable[[Any], torch.Tensor] = lambda out: out
    hf: bool = False  # a Hugging Face model (keyword forward, config, cache): model-level methods run on these

    def build(self, wide: bool = False, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory(wide).eval()

    def input(self, batch: int = 4, seed: int = 0) -> torch.Tensor:
        return self.make_input(torch.Generator().manual_seed(1000 + seed), batch)

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.output(model(x))


def _ids(g: torch.Generator, b: int) -> torch.Tensor:
    return torch.randint(0, 40, (b, 6), generator=g)


MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in [
        TinyModel(
            "mlp", lambda wide: MLP(hidden=24 if wide else 32), lambda g, b: torch.randn(b, 16, generator=g),
            ["fc1", "fc2"], ["fc1", "fc2"], ("linear",), extra={"modules_to_save": ["head"]},
        ),
        TinyModel(
            "block", lambda wide: Block(ff=48 if wide else 32), lambda g, b: torch.randn(b, 5, 16, generator=g),
            ["q", "k", "v", "o", "fc1", "fc2"],
            ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"], ("linear",),
        ),
        TinyModel(
            "conv1d", lambda wide: ConvNet1d(c=24 if wide else 16), lambda g, b: torch.randn(b, 4, 10, generator=g),
            ["conv1", "conv2"], ["conv1", "conv2"], ("conv1d",),
        ),
        TinyModel(
            "conv2d", lambda wide: ConvNet2d(c=24 if wide else 16), lambda g, b: torch.randn(b, 3, 6, 6, generator=g),
            ["conv1", "conv2"], ["conv1", "conv2"], ("conv2d",),
        ),
        TinyModel(
            "conv3d", lambda wide: ConvNet3d(c=12 if wide else 8),
            lambda g, b: torch.randn(b, 2, 4, 3, 3, generator=g), ["conv1", "conv2"], ["conv1", "conv2"], ("conv3d",),
        ),
        TinyModel(
            "embedding", lambda wide: EmbeddingModel(d=24 if wide else 16), _ids, ["emb"], ["emb"], ("embedding",),
        ),
        TinyModel(
            "gpt2", lambda wide: tiny_gpt2(32 if wide else 16), _ids, ["c_attn", "c_proj", "c_fc"],
            ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"], ("gpt2_conv1d",),
            output=lambda out: out.last_hidden_state, hf=True,
        ),
        TinyModel(
            "norm", lambda wide: NormNet(d=24 if wide else 16), lambda g, b: torch.randn(b, 5, 16, generator=g),
            ["ln", "rms", "ln_f"], ["ln", "rms", "ln_f"], ("norm",), extra={"modules_to_save": ["head"]},
        ),
    ]
}


def model_for(info: Any) -> str:
    """The one tiny model a per-method check (precision, compile) runs a method on: GPT-2 for model-level methods,
    the MLP for Linear hosts, the norm model for norm hosts, else the first model whose hosts the method adapts."""
    if info.model_level:
        return "gpt2"
    if "linear" in info.hosts:
        return "mlp"
    if "norm" in info.hosts:
        return "norm"
    return next(name for name, spec in MODELS.items() if set(spec.hosts) <= set(info.hosts))


def matrix_config_fields(method: str, model: TinyModel) -> dict[str, Any]:
    """The generic config of the matrix: the model's targets (+ its generic extras) and any declared override.
    Model-level methods target no layers: they get the declared overrides only."""
    from peftkit.core.registry import get

    fields: dict[str, Any] = {} if get(method).model_level else {"target_modules": list(model.targets), **model.extra}
    fields.update(METHOD_OVERRIDES.get(method, {}))
    fields.update(METHOD_MODEL_OVERRIDES.get((method, model.name), {}))
    return fields


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Add N(0, std²) noise to every trainable parameter (the active adapter's tensors, saved copies, biases)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
