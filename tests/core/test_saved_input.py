"""The fused low-rank kernel keeps no copy of an input that its producer's autograd node can rebuild (LayerNorm,
GELU, SiLU, a gated product): ``Gᵀ·x`` from the packed form equals the one from ``x``, gradients equal the reference,
and the input's storage is not among the tensors the graph keeps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.bench.timing import kept_storages
from peftkit.core import saved_input
from tolerance import assert_near


def _u(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2 + 0.5).requires_grad_()


def _ln(affine: bool, bias: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    torch.manual_seed(3)
    ln = nn.LayerNorm(12, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ln.weight.normal_(1, 0.3)
            if bias:
                ln.bias.normal_(0, 0.3)
    return ln


PRODUCERS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "layer_norm": ("layer_norm", _ln(True, True)),
    "layer_norm_no_bias": ("layer_norm", _ln(True, False)),
    "layer_norm_no_affine": ("layer_norm", _ln(False, False)),
    "gelu": ("rebuild", F.gelu),
    "gelu_tanh": ("rebuild", lambda u: F.gelu(u, approximate="tanh")),
    "silu": ("rebuild", F.silu),
    "gated_product": ("rebuild", lambda u: F.silu(u) * (u * 0.5 + 1)),
    # Llama's RMSNorm: γ ⊙ (u ⊙ rsqrt(mean(u²) + ε)) with γ frozen: the product node keeps γ only, the normalised u
    # is rebuilt from the inner product's u and rsqrt (a rows × 1 factor)
    "rms_norm_frozen_scale": ("rebuild", lambda u: (torch.linspace(0.5, 1.5, 12)
                                                     * (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6)))),
    "rms_norm_trained_scale": ("rebuild", lambda u: (torch.linspace(0.5, 1.5, 12).requires_grad_()
                                                      * (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6)))),
    "scaled_by_python_number": ("plain", lambda u: F.gelu(u) * 0.5),
    "leaf": ("plain", lambda u: u),
    "relu": ("plain", F.relu),  # ReluBackward0 keeps x itself: saving x costs nothing more
    "dropout_mask": ("plain", lambda u: u * (torch.rand(u.shape, generator=torch.Generator().manual_seed(1)) > 0.3)),
    "view": ("plain", lambda u: F.gelu(u).reshape(-1, 12).reshape(u.shape)),
}


@pytest.mark.parametrize("width", [4, 30], ids=["narrow_G", "wide_G"])
@pytest.mark.parametrize("name", list(PRODUCERS))
def test_pack_and_left_matmul_match_the_input(name: str, width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """G narrower than x (a low-rank factor's gradient: a LayerNorm enters through its identity) and wider (a dense
    weight's gradient into a widening layer: a LayerNorm's output is rebuilt in row blocks instead)."""
    kind, fn = PRODUCERS[name]
    monkeypatch.setattr(saved_input, "_BLOCK_ELEMENTS", 12 * 5)  # several recompute blocks of 5 rows (+ a remainder)
    x = fn(_u(3, 7, 12))
    got_kind, extra, kept = saved_input.pack(x)
    assert got_kind == kind
    if kind != "plain":
        assert all(t.data_ptr() != x.data_ptr() for t in kept)
    g = torch.randn(21, width, generator=torch.Generator().manual_seed(2))
    ref = g.t() @ x.detach().reshape(-1, 12)
    blocks = []
    real_rows = saved_input._layer_norm_rows
    monkeypatch.setattr(saved_input, "_layer_norm_rows", lambda *a: blocks.append(1) or real_rows(*a))
    got = saved_input.left_matmul(got_kind, extra, kept, g)
    assert got.shape == (width, 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(blocks) == (5 if kind == "layer_norm" and width > 12 else 0)  # 21 rows in blocks of 5


def test_saved_tensor_hooks_fall_back_to_the_input_itself() -> None:
    """Under checkpointing / offloading hooks, reading a producer's saved tensors could trigger the hook: keep x."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        x = F.gelu(_u(4, 12))
        assert saved_input.pack(x)[0] == "plain"
    assert saved_input.pack(F.gelu(_u(4, 12)))[0] == "rebuild"


class Block(nn.Module):
    """LayerNorm → Linear → GELU → Linear → (gated) Linear: every producer kind in front of an adapted Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.gate = nn.Linear(32, 24, bias=False)
        self.val = nn.Linear(32, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(self.ln(u)))
        return self.down(F.silu(self.gate(h)) * self.val(h))


def _adapted(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    m = Block()
    with torch.no_grad():
        m.ln.weight.normal_(1, 0.2)
        m.ln.bias.normal_(0, 0.2)
    peftkit.adapt(m, peftkit.config("lora", target_modules=["up", "gate", "val", "down"], r=4, alpha=8))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return m


def test_fused_gradients_match_the_reference_and_rebuilt_inputs_are_not_kept() -> None:
    m = _adapted()
    u = _u(2, 5, 16, seed=4)
    acts: dict[str, torch.Tensor] = {}
    for name in ("up", "gate", "down"):
        getattr(m, name).register_forward_pre_hook(lambda mod, args, name=name: acts.__setitem__(name, args[0]))
    out = m(u)
    assert "FusedLowRankLinear" in type(out.grad_fn).__name__
    kept = kept_storages(out)
    for name in ("up", "gate", "down"):  # LayerNorm output, GELU output, the gated product: none kept
        assert acts[name].untyped_storage().data_ptr() not in kept, name
    acts.clear()
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    grad_u = u.grad.clone()

    ref = _adapted()  # the same function through the unfused activation path
    for layer in (ref.up, ref.gate, ref.val, ref.down):
        layer.adapters["default"].fused_forward = lambda x: None
    u2 = u.detach().clone().requires_grad_()
    ref(u2).pow(2).sum().backward()
    assert_near(u2.grad, grad_u, 64, layers=6)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_near(p.grad, grads[n], 64, layers=6, msg=n)


def test_inference_without_grad_skips_autograd_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without grad the fused arithmetic runs as plain calls (the autograd Function is never entered) and equals
    the unfused activation path."""
    from peftkit.core import lowrank

    m = _adapted()
    u = _u(3, 16, seed=5).detach()
    ref = _adapted()
    for layer in (ref.up, ref.gate, ref.val, ref.down):
        layer.adapters["default"].fused_forward = lambda x: None

    def refuse(*args: object) -> None:
        raise AssertionError("autograd Function entered without grad")

    monkeypatch.setattr(lowrank._FusedLowRankLinear, "apply", refuse)
    with torch.no_grad():
        y, y_ref = m(u), ref(u)
    assert_near(y, y_ref, 64, layers=6)
    with pytest.raises(AssertionError, match="autograd Function entered"):
        m(u)  # with grad on (A, B trainable) the Function is used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_norm_keeps_its_output(dtype: torch.dtype) -> None:
    """A half-precision LayerNorm saves μ and 1/σ rounded to its dtype: too coarse to rebuild x from."""
    ln = nn.LayerNorm(12).to(dtype)
    x = ln(_u(5, 12).to(dtype))
    assert saved_input.pack(x)[0] == "plain"
    assert saved_input.pack(F.gelu(_u(5, 12).to(dtype)))[0] == "rebuild"


def test_layer_norm_identity_is_accurate_when_the_rows_mean_dominates() -> None:
    """|μ|/σ = 40: the two terms of the identity nearly cancel; the float32 result stays within 1e-4 relative."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(64)
    u = (torch.randn(300, 64) * 0.5 + 20).requires_grad_()
    x = ln(u)
    kind, extra, kept = saved_input.pack(x)
    assert kind == "layer_norm"
    g = torch.randn(300, 4)
    ref = g.double().t() @ x.detach().double()
    got = saved_input.left_matmul(kind, extra, kept, g).double()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def _tiny_hf(kind: str, fused: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":  # ln_1 → c_attn, ln_2 → c_fc (LayerNorm), NewGELU's 0.5·x·(1 + tanh …) → c_proj (a product)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
                                           resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                           eos_token_id=0))
        targets: str | list[str] = ["c_attn", "c_proj", "c_fc"]
    else:  # RMSNorm → q/k/v and gate/up, SiLU(gate) ⊙ up → down_proj: all rebuilt
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                             bos_token_id=0, eos_token_id=0))
        targets = "all-linear"
    peftkit.adapt(model, peftkit.config("lora", target_modules=targets, r=4))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, 0, 0.1)
    if not fused:
        from peftkit.core.layer import AdaptedLayer

        for mod in model.modules():
            if isinstance(mod, AdaptedLayer):
                mod.adapters["default"].fused_forward = lambda x: None
    return model.train()


@pytest.mark.parametrize("kind, expected", [("gpt2", {"layer_norm", "rebuild"}), ("llama", {"rebuild"})])
def test_transformers_models_rebuild_inputs_and_match_the_unfused_gradients(
    kind: str, expected: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    pack = saved_input.pack
    monkeypatch.setattr(saved_input, "pack", lambda x: (lambda r: (seen.append(r[0]), r)[1])(pack(x)))
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for fused in (True, False):
        model = _tiny_hf(kind, fused)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert expected <= set(seen)
    if kind == "llama":  # kept: layer 0's q/k/v input (no grad_fn: frozen embeddings) and each o_proj's input
        assert seen.count("plain") == 3 + 2 and seen.count("rebuild") == 2 * 7 - 5, seen
    for n, g in grads[0].items():
        assert_near(g, grads[1][n], 64, layers=6, msg=n)


# --- under torch.autocast: the fused kernel's input is a bfloat16 cast of a float32 producer's output -------------

CAST_CASES = [n for n, (k, _) in PRODUCERS.items() if k != "plain"]


@pytest.mark.parametrize("width", [4, 30], ids=["narrow_G", "wide_G"])
@pytest.mark.parametrize("name", CAST_CASES)
def test_cast_of_a_rebuildable_output_is_rebuilt_and_rounded_the_same_way(
    name: str, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x = bf16(producer(u)) (what a fused kernel gets under autocast): packed as "cast" without x's storage; the
    rebuilt x is the forward's bit for bit for the recomputed kinds (a LayerNorm, rebuilt by its formula rather than
    its fused kernel, may move an element by one bfloat16 step), and so is ``Gᵀ·x``."""
    kind, fn = PRODUCERS[name]
    monkeypatch.setattr(saved_input, "_BLOCK_ELEMENTS", 12 * 5)
    x = fn(_u(3, 7, 12)).to(torch.bfloat16)
    got_kind, extra, kept = saved_input.pack(x)
    assert got_kind == "cast" and extra[0] == kind and extra[2] == torch.bfloat16
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in kept)
    assert all(t.dtype == torch.float32 for t in kept)
    g = torch.randn(21, width, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x2 = x.detach().reshape(-1, 12)
    rebuilt = saved_input.unpack(got_kind, extra, kept)
    got = saved_input.left_matmul(got_kind, extra, kept, g)
    assert rebuilt.dtype == got.dtype == torch.bfloat16 and got.shape == (width, 12)
    if kind == "rebuild":
        assert torch.equal(rebuilt, x2)
        assert torch.equal(got, g.t() @ x2)
    else:
        assert (rebuilt != x2).sum().item() <= 2
        torch.testing.assert_close(got, g.t() @ x2, rtol=2e-2, atol=2e-2)
    blocks = [b for _, b in saved_input._row_blocks(got_kind, extra, kept, 21)]
    assert len(blocks) == 5 and torch.equal(torch.cat(blocks), rebuilt)  # column_dot's blocks: the same values


def test_cast_of_a_half_or_unrebuildable_output_keeps_the_input() -> None:
    """A cast whose source is not a float32/64 rebuildable output (a leaf, a ReLU, a bfloat16 GELU cast to float16)
    keeps x itself; a float32 cast (widening, not what autocast does) is not treated as one."""
    for x in (_u(5, 12).to(torch.bfloat16), F.relu(_u(5, 12)).to(torch.bfloat16),
              F.gelu(_u(5, 12).to(torch.bfloat16)).to(torch.float16)):
        assert saved_input.pack(x)[0] == "plain"
    assert saved_input.pack(F.gelu(_u(5, 12).to(torch.bfloat16)).float())[0] == "plain"


def _weight_copies(out: torch.Tensor, model: nn.Module) -> list[torch.Size]:
    """Shapes of the weights that the fused LoRA nodes in ``out``'s graph keep as copies rather than as the
    parameter itself."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    found, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_FusedLowRankLinearBackward":
            w = node.saved_tensors[0]
            if w.untyped_storage().data_ptr() not in params:
                found.append(w.shape)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def test_autocast_keeps_no_bf16_weight_copy_nor_rebuildable_inputs_and_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under bf16 autocast over a float32 block: the fused nodes keep the float32 weight (the parameter) rather than
    a bf16 copy, and no cast of the LayerNorm output; the kept bytes drop by at least those copies against the
    kernel keeping every input; the gradients are those of the generic path within bf16 tolerance."""
    u = _u(4, 64, 16, seed=4)
    m = _adapted()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(u)
    assert out.dtype == torch.bfloat16 and "FusedLowRankLinear" in type(out.grad_fn).__name__
    assert _weight_copies(out, m) == []
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    kept = sum(n for ptr, n in kept_storages(out).items() if ptr not in params)
    out.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    with monkeypatch.context() as mp:  # the same kernel, every input kept as it arrives
        mp.setattr(saved_input, "pack", lambda x: ("plain", None, (x,)))
        m_plain = _adapted()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_plain = m_plain(u.detach().requires_grad_())
        kept_plain = sum(n for ptr, n in kept_storages(out_plain).items()
                         if ptr not in {p.untyped_storage().data_ptr() for p in m_plain.parameters()})
        assert torch.equal(out_plain, out)
    ln_cast = 4 * 64 * 16 * 2  # the bf16 cast of the LayerNorm output into `up`
    assert kept <= kept_plain - ln_cast, (kept, kept_plain)

    ref = _adapted()
    for layer in (ref.up, ref.gate, ref.val, ref.down):
        layer.adapters["default"].fused_forward = lambda x: None
    u2 = u.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(u2).float().pow(2).sum().backward()
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_near(p.grad, grads[n], 16, dtype=torch.bfloat16, layers=6, msg=n)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_models_under_autocast_rebuild_through_the_cast(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 autocast over float32 GPT-2 / Llama: the LayerNorm / RMSNorm outputs reach the fused kernels through
    a cast and are rebuilt ("cast"); a Llama's gradients are bit for bit those of the same kernels keeping every
    input (its rebuilds are recomputations), a GPT-2's within bf16 tolerance (its LayerNorm's is a formula); both
    match the generic path within bf16 tolerance."""
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))
    seen: list[str] = []
    pack = saved_input.pack
    runs = {}
    for name in ("rebuilt", "plain", "generic"):
        with monkeypatch.context() as mp:
            if name == "rebuilt":
                mp.setattr(saved_input, "pack", lambda x: (lambda r: (seen.append(r[0]), r)[1])(pack(x)))
            elif name == "plain":
                mp.setattr(saved_input, "pack", lambda x: ("plain", None, (x,)))
            model = _tiny_hf(kind, fused=name != "generic")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            runs[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert "cast" in seen, seen
    assert torch.equal(runs["rebuilt"][0], runs["plain"][0])
    for n, g in runs["rebuilt"][1].items():
        if kind == "llama":
            assert torch.equal(g, runs["plain"][1][n]), n
        else:
            assert_near(g, runs["plain"][1][n], 16, dtype=torch.bfloat16, layers=4, msg=n)
        assert_near(g, runs["generic"][1][n], 16, dtype=torch.bfloat16, layers=4, msg=n)
