"""LoRA's LoftQ, EVA and CorDA inits: their defining properties, Hugging Face PEFT's numbers on the same model and
data, persistence both ways, and bad input."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.errors import PeftkitError
from peftkit.core.registry import get
from peftkit.methods.lora_inits import corda_factors, loftq
from peftkit.quant.nf4 import nf4_codes, nf4_round_trip
from tolerance import assert_near

peft = pytest.importorskip("peft")
T = ["0", "2", "4"]


def mlp() -> nn.Module:  # d_in of the LoftQ layers a multiple of 64 (see test_nf4_matches_bitsandbytes)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))


def data(n: int = 3, rows: int = 48, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=g) * torch.linspace(2, 0.05, 64)[:, None]  # a decaying input spectrum
    return [torch.randn(rows, 64, generator=g) @ mix + 0.3 for _ in range(n)]


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    return get("lora").calibrate(model, batches)


@contextlib.contextmanager
def cpu_for_peft_loftq() -> Iterator[None]:
    """PEFT's loftq_init moves tensors to "cuda"/"xpu" by name; on a CPU-only machine send them to the CPU (the
    algorithm and bitsandbytes' NF4 are the same there)."""
    orig_to, orig_parse = torch.Tensor.to, torch._C._nn._parse_to

    def fix(a):
        if isinstance(a, str) and a.split(":")[0] in ("cuda", "xpu"):
            return "cpu"
        return torch.device("cpu") if isinstance(a, torch.device) and a.type in ("cuda", "xpu") else a

    torch.Tensor.to = lambda self, *a, **k: orig_to(self, *map(fix, a), **{n: fix(v) for n, v in k.items()})
    torch._C._nn._parse_to = lambda *a, **k: orig_parse(*map(fix, a), **{n: fix(v) for n, v in k.items()})
    try:
        yield
    finally:
        torch.Tensor.to, torch._C._nn._parse_to = orig_to, orig_parse


def same_up_to_sign(a: torch.Tensor, b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor, n: int) -> None:
    """Rank-one terms (rows of A, columns of B) equal up to a common sign per term."""
    sign = torch.sign((a.double() * ref_a.double()).sum(1)).to(ref_a.dtype)
    assert_near(a.to(ref_a.dtype) * sign[:, None], ref_a, n, safety=200)
    assert_near(b.to(ref_b.dtype) * sign[None, :], ref_b, n, safety=200)


# -- NF4 and LoftQ -------------------------------------------------------------------------------------------
def test_nf4_matches_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(40, 48) * 0.2
    q, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes, absmax = nf4_codes(w)
    packed = q.view(-1)
    assert torch.equal(torch.stack([packed >> 4, packed & 15], 1).view(-1), codes.view(-1))
    assert torch.equal(st.absmax, absmax)
    # bitsandbytes 0.50's CPU dequantize misplaces blocks of 2-D weights whose rows are shorter than a block; the
    # flat tensor (same blocks) dequantises correctly
    flat = bnb.functional.quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4")
    assert torch.equal(bnb.functional.dequantize_4bit(*flat).view(w.shape), nf4_round_trip(w))


def test_loftq_properties() -> None:
    w = torch.randn(48, 64) * 0.1
    q1, a, b = loftq(w, 4, 1)
    assert torch.equal(q1, nf4_round_trip(w)) and torch.equal(nf4_round_trip(q1), q1)  # an NF4 point
    errs = []
    for t in range(1, 6):
        q, a, b = loftq(w, 4, t)
        assert torch.equal(nf4_round_trip(q), q)
        errs.append(float((w - q - b @ a).norm()))
    assert errs[0] < 0.95 * float((w - q1).norm())  # Q + BA closer to W than Q alone
    assert all(e2 <= e1 * (1 + 1e-6) for e1, e2 in zip(errs, errs[1:])) and errs[-1] < errs[0]


@pytest.mark.parametrize("alpha", [4.0, 16.0])
def test_loftq_layer_fits_the_quantised_base(alpha: float) -> None:
    model, x = mlp(), data(1)[0]
    w0 = {t: model.get_submodule(t).weight.detach().clone() for t in T}
    peftkit.adapt(model, peftkit.config("lora", r=4, alpha=alpha, init="loftq_iter_2", target_modules=T))
    for t in T:
        a = model.get_submodule(t).adapters["default"]
        q = a.host.weight_2d()
        assert torch.equal(nf4_round_trip(q), q)
        assert (w0[t] - q - a.s * a.lora_B @ a.lora_A).norm() < (w0[t] - nf4_round_trip(w0[t])).norm()
    assert torch.isfinite(model(x)).all()


def test_loftq_matches_peft_and_moves_both_ways(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq", target_modules=T,
                          loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=3))
    with cpu_for_peft_loftq(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(mlp(), cfg)
    model = mlp()
    peftkit.adapt(model, peftkit.config("lora", r=4, alpha=4, init="loftq_iter_3", target_modules=T))
    for t in T:
        p, k = pm.base_model.model.get_submodule(t), model.get_submodule(t)
        assert_near(k.base_layer.weight, p.base_layer.weight, 64, safety=100)
        assert_near(k.adapters["default"].lora_A, p.lora_A["default"].weight, 64, safety=100)
        assert_near(k.adapters["default"].lora_B, p.lora_B["default"].weight, 64, safety=100)
    x = data(1)[0]
    with torch.no_grad():
        for prm in [q for q in model.parameters() if q.requires_grad]:
            prm.add_(torch.randn_like(prm) * 0.05)
        ref = model(x)
    peftkit.save(model, tmp_path / "kit")  # peftkit reruns LoftQ on a fresh base: the same Q
    fresh = mlp()
    peftkit.load(fresh, tmp_path / "kit")
    assert torch.equal(fresh(x), ref)
    peftkit.save(model, tmp_path / "hf", format="hf")  # PEFT reads plain LoRA factors over the saved Q base
    q_base = copy.deepcopy(peftkit.unload(copy.deepcopy(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(q_base, str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert_near(back(x), ref, 128)


def test_loftq_failed_load_leaves_the_base_alone(tmp_path) -> None:
    model = mlp()
    peftkit.adapt(model, peftkit.config("lora", r=4, init="loftq", target_modules=T))
    peftkit.save(model, tmp_path / "a")
    other = mlp()
    other[4] = nn.Linear(64, 9)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PeftkitError, match="another base model"):
        peftkit.load(other, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# -- EVA -------------------------------------------------------------------------------------------------------
def test_eva_rows_are_top_right_singular_vectors_of_the_inputs() -> None:
    model, batches = mlp(), data()
    base_out = model(batches[0])
    peftkit.adapt(model, peftkit.config("lora", r=4, init="eva_rho_1", target_modules=T))
    calibrate(model, batches)
    x = torch.cat(batches).double()
    xc = x - x.mean(0)
    vh = torch.linalg.svd(xc, full_matrices=False)[2][:4]
    a = model.get_submodule("0").adapters["default"]
    assert a.lora_A.shape == (4, 64) and not a.lora_B.any()
    same_up_to_sign(a.lora_A, torch.zeros(128, 4), vh.float(), torch.zeros(128, 4), 64)
    assert torch.equal(model(batches[0]), base_out)  # B = 0: the output is the base's


def test_eva_matches_peft_rank_redistribution_and_components(tmp_path) -> None:
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    batches = data()
    cfg = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="eva", target_modules=T,
                          eva_config=peft.EvaConfig(rho=2.0, tau=0.99))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(mlp(), cfg)
        initialize_lora_eva_weights(pm, dataloader=batches, forward_fn=lambda m, b: m(b),
                                    prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                    show_progress_bar=False)
    model = mlp()
    peftkit.adapt(model, peftkit.config("lora", r=4, alpha=4, init="eva", target_modules=T))
    calibrate(model, batches)
    ranks = {t: model.get_submodule(t).adapters["default"].r for t in T}
    assert {t: k for t, k in ranks.items() if k != 4} == pm.peft_config["default"].rank_pattern != {}
    for t in T:
        pa, a = pm.base_model.model.get_submodule(t).lora_A["default"].weight, model.get_submodule(t).adapters[
            "default"].lora_A
        cos = (pa.double() @ a.double().t()).diagonal().abs()
        assert cos.min() > 0.95, (t, cos)  # PEFT's incremental PCA stops at cosine τ between steps
    # persistence: peftkit's file reloads (new ranks in its config) and PEFT reads the same ranks
    x = batches[0]
    with torch.no_grad():
        for prm in [q for q in model.parameters() if q.requires_grad]:
            prm.add_(torch.randn_like(prm) * 0.05)
        ref = model(x)
    peftkit.save(model, tmp_path / "kit")
    fresh = mlp()
    peftkit.load(fresh, tmp_path / "kit")
    assert torch.equal(fresh(x), ref)
    peftkit.save(model, tmp_path / "hf", format="hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(mlp(), str(tmp_path / "hf")).eval()
        with torch.no_grad():
            assert_near(back(x), ref, 128)
        pm.save_pretrained(str(tmp_path / "from_peft"))
    kit = mlp()
    peftkit.load(kit, tmp_path / "from_peft")
    with torch.no_grad():
        assert_near(kit(x), pm(x), 128)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.low, self.iso = nn.Linear(64, 8), nn.Linear(64, 8)
        self.proj = torch.randn(64, 6) @ torch.randn(6, 64)  # the low branch sees a 6-dim subspace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x @ self.proj) + self.iso(x)


def test_eva_rank_zero_drops_the_layer(tmp_path) -> None:
    model, x = TwoBranches(), torch.randn(256, 64)
    peftkit.adapt(model, peftkit.config("lora", r=3, alpha=3, init="eva", target_modules=["low", "iso"]))
    calibrate(model, [x[:128], x[128:]])
    assert model.low.adapters["default"].r == 6 and not hasattr(model.iso, "adapters")  # all of Σr = 6 to "low"
    assert model.low.adapters["default"].s == 1.0  # α ← α·k/r keeps α/r
    peftkit.save(model, tmp_path / "a")
    fresh = TwoBranches()
    peftkit.load(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), model(x)) and not hasattr(fresh.iso, "adapters")


def test_eva_rank_redistribution_by_hand() -> None:
    from peftkit.methods.lora_inits import eva_ranks

    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.4, 0.2, 0.15, 0.1]),
              "c": torch.tensor([0.9, 0.05, 0.03, 0.01])}
    two = dict.fromkeys(ratios, 2)
    assert eva_ranks(ratios, two, 2.0) == {"a": 2, "b": 3, "c": 1}  # the 6 largest of the top-4 of each
    assert eva_ranks(ratios, two, 1.0) == two  # ρ = 1: no redistribution
    assert eva_ranks(ratios, two, 2.0, {"b": 2}) == {"a": 3, "b": 2, "c": 1}  # b's rank capped at its width


def test_eva_needs_calibration_data() -> None:
    model = mlp()
    peftkit.adapt(model, peftkit.config("lora", r=4, init="eva", target_modules=T))
    with pytest.raises(PeftkitError, match="no calibration batch reached"):
        calibrate(model, [])


def test_plain_lora_calibrate_reads_no_data() -> None:
    model = mlp()
    peftkit.adapt(model, peftkit.config("lora", r=4, target_modules=T))

    def never():
        raise AssertionError("batches read")
        yield

    assert calibrate(model, never()) == {}


# -- CorDA ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_definitions_by_hand(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1])
    cov = x.t() @ x / 30
    a, b = corda_factors(w, cov, 2, mode, s=0.5)
    fixed = cov + torch.eye(5, dtype=torch.float64) * cov.diagonal().mean() * 0.01
    sv = torch.linalg.svdvals(w @ fixed)
    part = 0.5 * b @ a @ fixed  # the adapter's share of W·C
    assert torch.linalg.matrix_rank(part) == 2
    kept = sv[:2] if mode == "ipm" else sv[-2:]
    assert torch.allclose(torch.linalg.svdvals(part)[:2], kept.flip(0) if mode == "kpm" and kept[0] < kept[1]
                          else kept, atol=1e-10)
    # IPM: the residual's W·C is the best rank-(n−r) tail; KPM: the residual keeps the top components
    rest = torch.linalg.svdvals((w - 0.5 * b @ a) @ fixed)
    want = sv[2:] if mode == "ipm" else sv[:-2]
    assert torch.allclose(rest[: len(want)], want, atol=1e-10) and rest[len(want):].abs().max() < 1e-10


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft_preprocess(mode: str, tmp_path) -> None:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    batches = data()
    base = mlp()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="corda", target_modules=T,
                          corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(base, cfg, run_model=lambda: [base(b) for b in batches])
    pm = peft.get_peft_model(base, cfg)
    model = mlp()
    y0 = model(batches[0])
    peftkit.adapt(model, peftkit.config("lora", r=4, alpha=8, init="corda" if mode == "ipm" else "corda_kpm",
                                        target_modules=T))
    calibrate(model, batches)
    assert_near(model(batches[0]), y0, 128)  # ΔW = 0 at init
    for t in T:
        p, a = pm.base_model.model.get_submodule(t), model.get_submodule(t).adapters["default"]
        assert_near(a.host.weight_2d() - a.s * a.pissa_B0 @ a.pissa_A0, p.base_layer.weight, 128, safety=100)
        same_up_to_sign(a.lora_A, a.lora_B, p.lora_A["default"].weight, p.lora_B["default"].weight, 128)
    # peftkit → PEFT format (rank-2r plain LoRA on the untouched base) → PEFT: same outputs
    with torch.no_grad():
        for prm in [q for q in model.parameters() if q.requires_grad]:
            prm.add_(torch.randn_like(prm) * 0.05)
        ref = model(batches[0])
    peftkit.save(model, tmp_path / "hf", format="hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(mlp(), str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert_near(back(batches[0]), ref, 128)


# -- bad input -------------------------------------------------------------------------------------------------
def test_unknown_init_suggests_the_closest() -> None:
    with pytest.raises(PeftkitError, match="did you mean 'eva'"):
        peftkit.config("lora", init="evaa")
    with pytest.raises(PeftkitError, match="did you mean 'loftq'"):
        peftkit.config("lora", init="loftg")


@pytest.mark.parametrize("init", ["loftq", "eva", "corda"])
def test_data_inits_refuse_other_hosts(init: str) -> None:
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 4))
    with pytest.raises(PeftkitError, match="needs a float Linear or GPT-2 Conv1D layer, got a layer of kind 'embed"):
        peftkit.adapt(model, peftkit.config("lora", r=2, init=init, target_modules=["0"]))
    assert not any(isinstance(m, nn.Module) and hasattr(m, "adapters") for m in model.modules())
