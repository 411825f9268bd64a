"""RandLoRA property tests (spec: shared/methods/weight-space.md §11)."""

import copy
import json

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.randlora import RandLoraConfig, make_bases


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))


def test_init_identity_and_param_count():
    m = _model()
    x = torch.randn(5, 24)
    base = m(x)
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=4, alpha=8))
    assert torch.equal(m(x), base)
    # layer 0: m=24, N=6 -> 6*(4+24)=168 (the spec's verified count); layer 2: m=16, N=4 -> 4*(4+16)=80
    assert peftkit.summary(m).trainable == 168 + 80


def test_full_rank_update_and_merge():
    m = _model()
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=4, alpha=8))
    _perturb(m)
    for layer, full in [(m[0], 24), (m[2], 16)]:
        dw = layer.adapters["default"].delta_weight()
        assert dw.shape == (layer.host.d_out, layer.host.d_in)
        assert torch.linalg.matrix_rank(dw) == full
    x = torch.randn(7, 24)
    y = m(x)
    peftkit.merge(m)
    assert torch.allclose(m(x), y, atol=1e-5 * y.abs().max().item())


def test_activation_path_equals_delta_weight():
    m = _model()
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=4, alpha=8))
    _perturb(m)
    for layer, d_in in [(m[0], 24), (m[2], 32)]:
        a = layer.adapters["default"]
        x = torch.randn(3, d_in)
        assert torch.allclose(a.delta(x, None), x @ a.delta_weight().t(), atol=1e-5)


def test_update_is_the_spec_sum_over_bases():
    """ΔW = s·Σ_j B_cat[:, j] ⊗ Ã[j] (transposed when d_out < d_in) with Hugging Face PEFT's pairing — column
    j = i·r + k of B_cat is B_i[:, k], row j of Ã is λ[j // N, j % N]·A[j // N] ⊙ γ[j % N] — summed term by term in
    float64 from the shared bases, independent of the adapter's reshaped construction; the layer's output is
    x·(W0 + ΔW)ᵀ + b on both the dense (≥ d_out rows) and the activation path."""
    m = _model()
    r, alpha = 4, 8.0
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=r, alpha=alpha))
    _perturb(m)
    for layer in (m[0], m[2]):
        ad = layer.adapters["default"]
        d_out, d_in = ad.host.d_out, ad.host.d_in
        big, small = max(d_in, d_out), min(d_in, d_out)
        n = -(-small // r)
        a = ad.shared.A[:, :small].double()
        bases = ad.shared.B[:big, :n].double()  # (M, N, r)
        lam, gamma = ad.lam.detach().double(), ad.gamma.detach().double()  # (r, N), (N, m)
        dw = torch.zeros(big, small, dtype=torch.float64)
        for j in range(n * r):
            k, i = divmod(j, n)
            dw += torch.outer(bases[:, j // r, j % r], lam[k, i] * a[k] * gamma[i])
        dw = dw * (alpha / r)
        dw = dw.t() if d_out < d_in else dw
        assert dw.shape == (d_out, d_in)
        torch.testing.assert_close(ad.delta_weight().double(), dw, rtol=0, atol=1e-6 * dw.abs().max())
        w0, b0 = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
        for rows in (3, 2 * d_out):  # fewer rows than d_out: activation path; more: the dense path
            x = torch.randn(rows, d_in)
            expected = x.double() @ (w0 + dw).t() + b0
            torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_bases_are_peft_bases_and_outputs_match_peft(tmp_path):
    """The same seed gives Hugging Face PEFT's bases, and an adapter moves both ways with the same outputs."""
    peft = pytest.importorskip("peft")
    import warnings

    m = _model()
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=4, alpha=8, projection_seed=5))
    _perturb(m)
    x = torch.randn(5, 24)
    y = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_model(), peft.RandLoraConfig(r=4, randlora_alpha=8, projection_prng_key=5,
                                                               target_modules=["0", "2"]))
    ours = m[0].adapters["default"].shared
    assert torch.equal(pm.base_model.model[0].randlora_A["default"][:, 0], ours.A)
    assert torch.equal(pm.base_model.model[0].randlora_B["default"], ours.B)
    peftkit.save(m, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_model(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    with torch.no_grad():
        for p in loaded.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    loaded.save_pretrained(str(tmp_path / "b"))  # PEFT's default: the bases are saved too (checked against ours)
    back = _model()
    peftkit.load(back, tmp_path / "b")
    torch.testing.assert_close(back(x), loaded(x), rtol=0, atol=1e-5)


def test_bases_shared_seeded_and_not_saved(tmp_path):
    m = _model()
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=4, projection_seed=7))
    a0, a2 = m[0].adapters["default"], m[2].adapters["default"]
    assert a2.shared is a0.shared_store  # one set of bases for the whole model
    a, b = make_bases(RandLoraConfig(r=4, projection_seed=7), 32, 32)  # (M, m) from the largest d_out 32, d_in 32
    assert torch.equal(a0.shared.A, a) and torch.equal(a0.shared.B, b)
    peftkit.save(m, tmp_path, format="peftkit")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not any(k.endswith((".A", ".B")) for k in keys)
    assert "adapter.0.shared_store.checksum" in keys


def test_save_load_roundtrip_and_checksum(tmp_path):
    m = _model()
    ref = copy.deepcopy(m)
    peftkit.adapt(m, peftkit.config("randlora", target_modules=["0", "2"], r=4, alpha=8, projection_seed=3))
    _perturb(m)
    x = torch.randn(5, 24)
    y = m(x)
    peftkit.save(m, tmp_path, format="peftkit")
    fresh = copy.deepcopy(ref)
    peftkit.load(fresh, tmp_path)
    assert torch.equal(fresh(x), y)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["config"]["projection_seed"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    other = copy.deepcopy(ref)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError, match="checksum"):
        peftkit.load(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert not isinstance(other[0], peftkit.core.layer.AdaptedLayer)


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
def test_sparse_bases_are_ternary(kind):
    a, b = make_bases(RandLoraConfig(r=4, **{kind: True}), 64, 48)
    for t in (a, b):
        vals = torch.unique(t)
        assert len(vals) == 3 and torch.allclose(vals[0], -vals[2])
        assert abs(t.std().item() - 1.0) < 1e-5
    zero_frac = (b == 0).float().mean().item()
    expected = 1 - 1 / 3 if kind == "sparse" else 1 - 1 / 48**0.5
    assert abs(zero_frac - expected) < 0.05
