"""Hugging Face PEFT adapters of the kinds its own custom-model tests build (``tests/test_custom_models.py``:
``scripts/peft_test_cases.py`` runs that whole list): Conv3d and grouped-convolution hosts, ranks above a layer's
min(d_in, d_out), ``lora_bias``, DoRA on an Embedding, LoRA's ``trainable_token_indices``, nn.MultiheadAttention,
``target_parameters``, MiCA, options that change only training (VeLoRA, MonteCLoRA, one-block BD-LoRA), and
refusals that name the layer type or option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit

peft = pytest.importorskip("peft")


class Volume(nn.Module):
    """Conv3d → ReLU → Linear on (B, 2, 3, 4, 4) volumes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(2, 6, 3, padding=1)
        self.proj = nn.Linear(6 * 3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).flatten(1))


class Narrow(nn.Module):
    """Linear 12 → 3 → LayerNorm → Linear 3 → 12, plus a grouped Conv1d and a MultiheadAttention on the side."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Linear(12, 3)
        self.norm = nn.LayerNorm(3)
        self.up = nn.Linear(3, 12)
        self.grouped = nn.Conv1d(4, 4, 1, groups=2)
        self.mha = nn.MultiheadAttention(12, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(self.down(x)))
        return h + self.mha(h, h, h)[0] + self.grouped(h.view(-1, 4, 3)).view_as(h)


class _ParamLinear(nn.Module):
    """A linear map a hand-written module computes from its own parameter (stored (d_in, d_out), as in PEFT's
    tests): no nn.Linear to adapt, only the parameter."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Params(nn.Module):
    """_ParamLinear 12 → 8 → tanh → nn.Linear 8 → 12."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hand = _ParamLinear(12, 8)
        self.lin = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.hand(x)))


class Experts(nn.Module):
    """A mixture of 3 experts as MoE layers store them: ``up`` (3, 6, 12) maps 12 → 6 per expert (or, with
    ``is_transposed``, (3, 12, 6) used as x·W), ``down`` a 3-D stack read by another module; a fixed soft routing."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.is_transposed = transposed
        self.up = nn.Parameter(torch.randn(3, 12, 6) / 4 if transposed else torch.randn(3, 6, 12) / 4)
        self.route = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bti,eio->bteo" if self.is_transposed else "bti,eoi->bteo", x, self.up)
        return (torch.softmax(self.route(x), -1).unsqueeze(-1) * torch.tanh(h)).sum(2)


class MoE(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.experts = Experts(transposed)
        self.head = nn.Linear(6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x))


class Tokens(nn.Module):
    """Embedding (30 × 12) → Linear 12 → 12."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 12)
        self.lin = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


def _peft_saved(model: nn.Module, config: Any, directory: Path) -> torch.Tensor:
    """Adapt ``model`` with PEFT, randomise the trained tensors, save; returns its output on the fixed input."""
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(directory)
    with torch.no_grad():
        return pm(_input(model))


def _input(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(model, Tokens):
        return torch.randint(0, 30, (4, 7), generator=g)
    return torch.randn(4, 2, 3, 4, 4, generator=g) if isinstance(model, Volume) else torch.randn(4, 5, 12, generator=g)


def _both_ways(fresh, config: Any, tmp_path: Path, merges: bool = True) -> None:
    """PEFT → peftkit, merged (``merges``: PEFT merges it; else peftkit's merge must refuse and change nothing),
    peftkit → PEFT: the same outputs (fp32, 1e-5)."""
    y = _peft_saved(fresh(), config, tmp_path / "peft")
    ours = fresh().eval()
    peftkit.load(ours, tmp_path / "peft")
    x = _input(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
        if merges:
            peftkit.merge(ours)
            torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
            peftkit.unmerge(ours)
        else:
            with pytest.raises(peftkit.PeftkitError, match="cannot"):
                peftkit.merge(ours)
            torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    peftkit.save(ours, tmp_path / "back", format="hf")
    back = peft.PeftModel.from_pretrained(fresh(), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "ia3_feedforward"])
def test_conv3d_adapters_move_both_ways(kind: str, tmp_path: Path) -> None:
    if kind.startswith("ia3"):
        ff = ["conv"] if kind == "ia3_feedforward" else []
        config = peft.IA3Config(target_modules=["conv", "proj"], feedforward_modules=ff, init_ia3_weights=False)
    else:
        config = peft.LoraConfig(target_modules=["conv", "proj"], r=4, use_dora=kind == "dora",
                                 init_lora_weights=False)
    _both_ways(Volume, config, tmp_path)


def test_rank_above_the_layer_limit_loads_from_a_file(tmp_path: Path) -> None:
    """PEFT allows r > min(d_in, d_out) (here r = 8 on a 12 → 3 layer); the tensors are exact, so they load."""
    _both_ways(Narrow, peft.LoraConfig(target_modules=["down", "up"], r=8, init_lora_weights=False), tmp_path)
    with pytest.raises(peftkit.PeftkitError, match="rank 8 exceeds"):  # creating one is still refused
        peftkit.adapt(Narrow(), peftkit.config("lora", target_modules=["down"], r=8))


@pytest.mark.parametrize("option", ["velora_config", "monteclora_config"])
def test_training_only_options_load_as_plain_lora_with_a_warning(option: str, tmp_path: Path) -> None:
    value = {"velora_config": lambda: peft.VeloraConfig(num_groups=2),
             "monteclora_config": lambda: peft.MontecloraConfig(num_samples=2)}[option]()
    config = peft.LoraConfig(target_modules=["down", "up"], r=2, init_lora_weights=False, **{option: value})
    with pytest.warns(UserWarning, match=option):
        _both_ways(Narrow, config, tmp_path)


@pytest.mark.parametrize("blocks", [
    {"target_modules_bd_b": ["up"], "nblocks": 3, "match_strict": False},
    {"target_modules_bd_a": ["up"], "target_modules_bd_b": ["down"], "nblocks": 3},
    {"target_modules_bd_a": ["down"], "nblocks": 1, "match_strict": False},
])
def test_block_diagonal_lora_moves_both_ways(blocks: dict, tmp_path: Path) -> None:
    bd = peft.tuners.lora.config.BdLoraConfig(**blocks)
    config = peft.LoraConfig(target_modules=["down", "up"], r=6, use_bdlora=bd, init_lora_weights=False)
    _both_ways(Narrow, config, tmp_path)
    ours = Narrow()
    peftkit.load(ours, tmp_path / "peft")
    nb = blocks["nblocks"]
    if "target_modules_bd_a" in blocks and nb > 1:  # A of 'up' (d_in 3) is kept as its 3 stacked 2×1 blocks
        assert ours.up.adapters["default"].lora_A.shape == (6, 1)


def test_kasa_moves_both_ways(tmp_path: Path) -> None:
    """PEFT truncates the base weight's 2 smallest singular directions when it builds (or loads) the adapter; peftkit
    keeps them as a frozen factor pair: the same outputs, and merged."""
    kasa = peft.tuners.lora.config.KasaConfig()
    config = peft.LoraConfig(target_modules=["down", "up"], r=2, kasa_config=kasa, init_lora_weights=False)
    with pytest.warns(UserWarning, match="kasa_config"):
        _both_ways(Narrow, config, tmp_path)


def test_lora_bias_moves_both_ways(tmp_path: Path) -> None:
    config = peft.LoraConfig(target_modules=["down", "up"], r=2, lora_bias=True, init_lora_weights=False)
    _both_ways(Narrow, config, tmp_path)
    ours = Narrow()
    peftkit.load(ours, tmp_path / "peft")
    assert peftkit.get_config(ours, peftkit.adapter_names(ours)[0]).lora_bias


@pytest.mark.parametrize("use_dora", [False, True])
def test_grouped_convolutions_load_unmerged_as_in_peft(use_dora: bool, tmp_path: Path) -> None:
    config = peft.LoraConfig(target_modules=["grouped", "up"], r=2, init_lora_weights=False, use_dora=use_dora)
    if not use_dora:
        _both_ways(Narrow, config, tmp_path, merges=False)  # PEFT cannot merge grouped convolutions either
        return
    _peft_saved(Narrow(), config, tmp_path)  # PEFT's DoRA norm mixes the groups' output channels: refused, named
    with pytest.raises(peftkit.PeftkitError, match="DoRA on 'grouped', a grouped convolution.*mixes the groups"):
        peftkit.load(Narrow(), tmp_path)


@pytest.mark.parametrize("kind", ["dora", "lora_tokens"])
def test_embedding_options_move_both_ways(kind: str, tmp_path: Path) -> None:
    if kind == "dora":
        config = peft.LoraConfig(target_modules=["emb", "lin"], r=4, use_dora=True, init_lora_weights=False)
    else:
        config = peft.LoraConfig(target_modules=["lin"], r=4, trainable_token_indices={"emb": [0, 3, 7]},
                                 init_lora_weights=False)
    _both_ways(Tokens, config, tmp_path)


def test_ln_tuning_of_a_linear_layer_moves_both_ways(tmp_path: Path) -> None:
    """PEFT's LN_TUNING trains a copy of any layer it targets, not only norms."""
    _both_ways(Narrow, peft.LNTuningConfig(target_modules=["down", "norm"]), tmp_path)


@pytest.mark.parametrize("targets", [["mha", "up"], ["mha"]])
def test_multihead_attention_moves_both_ways(targets: list[str], tmp_path: Path) -> None:
    """PEFT adapts the packed in_proj_weight and out_proj of an nn.MultiheadAttention together (out_proj's update
    counted twice, as PEFT computes it); peftkit reads, merges and writes it back with the same outputs."""
    _both_ways(Narrow, peft.LoraConfig(target_modules=targets, r=2, init_lora_weights=False), tmp_path)
    ours = Narrow()
    peftkit.load(ours, tmp_path / "peft")
    assert ours.mha.host.kind == "mha" and set(ours.mha.adapters["default"].state_dict()) == {
        "lora_A", "lora_B", "lora_A_out", "lora_B_out"}


@pytest.mark.parametrize("kwargs,kinds", [
    ({"target_parameters": ["hand.weight"]}, {"parameter"}),
    ({"target_parameters": ["hand.weight"], "target_modules": ["lin"]}, {"parameter", "linear"}),
    ({"target_parameters": ["weight"], "r": 3, "lora_alpha": 6, "use_rslora": True}, {"parameter"}),
])
def test_target_parameters_move_both_ways(kwargs: dict, kinds: set[str], tmp_path: Path) -> None:
    """LoRA on bare parameters (PEFT's ``ParamWrapper``): a hand-written module's weight, with a layer targeted as
    usual, and a suffix that names both weights."""
    _both_ways(Params, peft.LoraConfig(init_lora_weights=False, **{"r": 2, **kwargs}), tmp_path)
    ours = Params()
    peftkit.load(ours, tmp_path / "peft")
    cfg = peftkit.get_config(ours, "default")
    assert cfg.target_parameters == kwargs["target_parameters"]
    assert {la.host.kind for _, la in peftkit.core.state.adapted_layers(ours)} == kinds


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_stacks_move_both_ways(transposed: bool, tmp_path: Path) -> None:
    """LoRA on a 3-D stack of experts (PEFT's ParamWrapper with num_experts > 1): one factor pair per expert, in
    PEFT's stacking, either expert layout."""
    config = peft.LoraConfig(target_parameters=["experts.up"], target_modules=["head"], r=2, init_lora_weights=False)
    _both_ways(lambda: MoE(transposed), config, tmp_path)
    ours = MoE(transposed)
    peftkit.load(ours, tmp_path / "peft")
    host = ours.experts.host
    assert (host.experts, host.transposed, host.d_in, host.d_out) == (3, transposed, 12, 18)
    assert ours.experts.adapters["default"].lora_A.shape == (6, 12)


def test_mica_moves_both_ways_and_keeps_b_frozen(tmp_path: Path) -> None:
    """PEFT's MiCA (init_lora_weights="mica"): B frozen, A trained. Loaded in peftkit B stays frozen when training
    continues, and the adapter goes back to PEFT with that init."""
    y = _peft_saved(Narrow(), peft.LoraConfig(target_modules=["down", "up"], r=2, init_lora_weights="mica"),
                    tmp_path / "peft")
    ours = Narrow().eval()
    peftkit.load(ours, tmp_path / "peft", trainable=True)
    x = _input(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    adapter = ours.up.adapters["default"]
    assert peftkit.get_config(ours, "default").init == "mica"
    assert not adapter.lora_B.requires_grad and adapter.lora_A.requires_grad
    peftkit.save(ours, tmp_path / "back", format="hf")
    back = peft.PeftModel.from_pretrained(Narrow(), tmp_path / "back").eval()
    assert back.peft_config["default"].init_lora_weights == "mica"
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets,config,pattern", [
    (["out_proj"], "lora", r"'mha.out_proj' is a projection of an nn.MultiheadAttention.*target the "
                           r"nn.MultiheadAttention itself"),
])
def test_refusals_name_the_layer_type(targets: list[str], config: str, pattern: str, tmp_path: Path) -> None:
    if config == "ln_tuning":
        cfg = peft.LNTuningConfig(target_modules=targets)
    else:
        cfg = peft.LoraConfig(target_modules=targets, r=2, init_lora_weights=False)
    _peft_saved(Narrow(), cfg, tmp_path)
    model = Narrow()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError, match=pattern) as err:
        peftkit.load(model, tmp_path)
    assert "another architecture" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_another_architecture_is_still_named_so(tmp_path: Path) -> None:
    _peft_saved(Narrow(), peft.LoraConfig(target_modules=["down"], r=2), tmp_path)
    with pytest.raises(peftkit.PeftkitError, match="another architecture"):
        peftkit.load(Volume(), tmp_path)
