"""Hugging Face PEFT names as drop-in spellings: a config built with ``peft``'s own classes, handed to
``peftkit.from_peft_config`` or spelled out as ``peftkit.config(name, **cfg.to_dict())``, adapts the same modules with
the same trainable-parameter count as ``peft.get_peft_model`` and — with PEFT's trained weights in it — computes the
same outputs; every PEFT alias sets its peftkit field; PEFT options peftkit cannot honour are refused by name;
unknown names get a "did you mean"; ``init_lora_weights`` variants start where PEFT starts."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.errors import PeftkitError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 100, (3, 7), generator=g)}


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        y = model(**_inputs(), output_hidden_states=True)
    return torch.cat([y.logits.flatten(), y.hidden_states[-1].flatten()])


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_model(cfg: Any, base: nn.Module, tmp: Path) -> nn.Module:
    """``peft.get_peft_model`` with every trainable tensor moved off its init (B = 0 would hide the update), saved
    to ``tmp`` in PEFT's format."""
    pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    pm.save_pretrained(str(tmp))
    return pm


#: (peftkit method, a PEFT config factory); each shared method, several field combinations for the LoRA family
CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    "lora": ("lora", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.05, task_type="SEQ_CLS")),
    "lora-patterns": ("lora", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], use_rslora=True,
        rank_pattern={"value": 2, r"layer\.1\..*dense": 6}, alpha_pattern={"query": 32}, bias="lora_only",
        exclude_modules=["attention.output.dense"], init_lora_weights="gaussian", task_type="SEQ_CLS")),
    "lora-layers": ("lora", lambda: peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], layers_to_transform=1, layers_pattern="layer",
        modules_to_save=["pooler"], fan_in_fan_out=False, task_type="SEQ_CLS")),
    "dora": ("dora", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_dora=True, task_type="SEQ_CLS")),
    "ia3": ("ia3", lambda: peft.IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], task_type="SEQ_CLS")),
    "lntuning": ("lntuning", lambda: peft.LNTuningConfig(target_modules=["LayerNorm"], task_type="SEQ_CLS")),
    "prompt_tuning": ("prompt_tuning", lambda: peft.PromptTuningConfig(
        num_virtual_tokens=4, task_type="SEQ_CLS")),
    "prefix_tuning": ("prefix_tuning", lambda: peft.PrefixTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "prefix_tuning-mlp": ("prefix_tuning", lambda: peft.PrefixTuningConfig(  # encoder_hidden_size: the model's
        num_virtual_tokens=3, prefix_projection=True, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_config_adapts_like_peft(case: str, tmp_path: Path) -> None:
    method, make = CASES[case]
    cfg = peftkit.from_peft_config(make())
    assert cfg.method == method and cfg == peftkit.config(method, **make().to_dict())
    assert cfg.task_type == make().task_type
    build = _llama if "prefix" in case else _bert
    ours = peftkit.adapt(build(), cfg)
    pm = _peft_model(make(), build(), tmp_path)
    # the same parameters train: PEFT's task head (SEQ_CLS → classifier in modules_to_save) included
    assert peftkit.summary(ours).trainable == _trainable(ours) == _trainable(pm)
    loaded = build()
    peftkit.load(loaded, tmp_path)
    if "prefix" not in case:  # PEFT's prefix tuning trains an MLP but saves the table it computes (loads folded)
        # PEFT's trained weights, read by peftkit's PEFT-format reader, fit the model built from the config exactly
        ours.load_state_dict(loaded.state_dict(), strict=True)
        torch.testing.assert_close(_out(ours), _out(pm), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_out(loaded), _out(pm), atol=1e-5, rtol=1e-5)


def test_randlora_config_trains_as_many_values_as_peft() -> None:
    """RandLoRA: the same trainable count as PEFT (its random bases are drawn differently, so outputs are not
    compared) and ΔW = 0 at init."""
    def make() -> Any:
        return peft.RandLoraConfig(r=8, randlora_alpha=64, target_modules=["query", "value"], randlora_dropout=0.1,
                                   projection_prng_key=7, task_type="SEQ_CLS")

    cfg = peftkit.from_peft_config(make())
    assert (cfg.method, cfg.r, cfg.alpha, cfg.dropout, cfg.projection_seed) == ("randlora", 8, 64.0, 0.1, 7)
    assert cfg == peftkit.config("randlora", **make().to_dict())
    base = _out(_bert())
    ours = peftkit.adapt(_bert(), cfg)
    assert _trainable(ours) == _trainable(peft.get_peft_model(_bert(), make()))
    torch.testing.assert_close(_out(ours), base)


def test_peftkit_lora_config_takes_peft_constructor_arguments() -> None:
    cfg = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q"], lora_dropout=0.05, task_type="SEQ_CLS")
    assert isinstance(cfg, peftkit.LoraConfig)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.task_type) == (8, 16.0, 0.05, ["q"], "SEQ_CLS")
    assert "lora_alpha" not in cfg.to_dict()  # the instance holds (and saves) peftkit's names
    dora = peftkit.LoraConfig(r=4, use_dora=True, target_modules=["q"])
    assert type(dora).__name__ == "DoraConfig" and dora.r == 4
    assert peftkit.IA3Config(feedforward_modules=["fc2"], target_modules=["fc1", "fc2"]).feedforward_modules == ["fc2"]


# (method, PEFT keywords, peftkit field, expected value)
ALIASES = [
    ("lora", {"lora_alpha": 16}, "alpha", 16.0),
    ("lora", {"lora_dropout": 0.1}, "dropout", 0.1),
    ("lora", {"use_rslora": True}, "rslora", True),
    ("lora", {"init_lora_weights": True}, "init", "kaiming"),
    ("lora", {"init_lora_weights": False}, "init", "random"),
    ("lora", {"init_lora_weights": "gaussian"}, "init", "gaussian"),
    ("lora", {"init_lora_weights": "pissa"}, "init", "pissa"),
    ("lora", {"init_lora_weights": "pissa_niter_4"}, "init", "pissa_niter_4"),
    ("lora", {"init_lora_weights": "olora"}, "init", "olora"),
    ("lora", {"rank_pattern": {"q": 2, "k": 3}}, "overrides", {"k": {"r": 3}, "q": {"r": 2}}),
    ("lora", {"alpha_pattern": {"q": 4}}, "overrides", {"q": {"alpha": 4}}),
    ("lora", {"rank_pattern": {"q": 2}, "alpha_pattern": {"q": 4}}, "overrides",
     {"q": {"r": 2}, "(?:q)": {"alpha": 4}}),
    ("lora", {"target_modules": {"q", "k"}}, "target_modules", ["k", "q"]),
    ("lora", {"exclude_modules": {"k"}}, "exclude_modules", ["k"]),
    ("lora", {"modules_to_save": ["head"]}, "modules_to_save", ["head"]),
    ("lora", {"layers_to_transform": 1}, "layers_to_transform", [1]),
    ("lora", {"layers_pattern": ["h"]}, "layers_pattern", "h"),
    ("lora", {"bias": "lora_only"}, "bias", "adapter_only"),
    ("lora", {"task_type": "CAUSAL_LM"}, "task_type", "CAUSAL_LM"),
    ("lora", {"fan_in_fan_out": True}, "target_modules", ["q"]),  # accepted, read from the layer
    ("lora", {"inference_mode": False, "peft_type": "LORA", "revision": "x", "base_model_name_or_path": "m"},
     "r", 8),
    ("lora", {"inference_mode": True}, "inference_mode", True),
    ("dora", {"use_dora": True, "lora_alpha": 3}, "alpha", 3.0),
    ("dora", {"init_lora_weights": "gaussian"}, "init", "gaussian"),
    ("lora", {"init_lora_weights": "eva"}, "init", "eva"),
    ("lora", {"init_lora_weights": "corda"}, "init", "corda"),
    ("lora", {"init_lora_weights": "loftq"}, "init", "loftq"),
    ("ia3", {"feedforward_modules": ["q"]}, "feedforward_modules", ["q"]),
    ("ia3", {"init_ia3_weights": True, "fan_in_fan_out": False}, "feedforward_modules", ["q"]),
    ("lntuning", {"target_modules": None}, "target_modules", "all-norm"),
    ("prompt_tuning", {"prompt_tuning_init": "RANDOM"}, "init", "random"),
    ("prompt_tuning", {"prompt_tuning_init": "SAMPLE_VOCAB"}, "init", "vocab"),
    ("prompt_tuning", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "good bad"}, "init_text",
     "good bad"),
    ("prompt_tuning", {"tokenizer_name_or_path": "tok"}, "tokenizer", "tok"),
    ("prompt_tuning", {"num_virtual_tokens": 7, "token_dim": 32, "num_layers": 2, "num_attention_heads": 2,
                       "num_transformer_submodules": 1}, "num_virtual_tokens", 7),
    ("prefix_tuning", {"prefix_projection": False, "encoder_hidden_size": None}, "encoder_hidden_size", None),
    ("prefix_tuning", {"init_weights": None, "num_virtual_tokens": 4}, "num_virtual_tokens", 4),
    ("randlora", {"randlora_alpha": 32}, "alpha", 32.0),
    ("randlora", {"randlora_dropout": 0.2}, "dropout", 0.2),
    ("randlora", {"projection_prng_key": 5}, "projection_seed", 5),
    ("randlora", {"sparse": True, "save_projection": False}, "sparse", True),
]


@pytest.mark.parametrize("method,fields,attr,expected", ALIASES)
def test_every_alias_sets_its_field(method: str, fields: dict[str, Any], attr: str, expected: Any) -> None:
    if method in ("lora", "dora", "randlora", "ia3"):
        fields = {"target_modules": ["q"], **fields}
    if method == "ia3" and "feedforward_modules" not in fields:
        fields["feedforward_modules"] = ["q"]
    cfg = peftkit.config(method, **fields)
    assert cfg.method == method and getattr(cfg, attr) == expected


# (method, keywords, what the error must say)
REFUSED = [
    ("dora", {"lora_bias": True}, "lora_bias"),
    ("lora", {"use_dora": True, "lora_bias": True}, "lora_bias=True is not supported by peftkit's dora"),
    ("lora", {"use_dora": True, "use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ("lora", {"use_qalora": True}, "use_qalora"),
    ("lora", {"layer_replication": [[0, 1]]}, "layer_replication"),
    ("dora", {"target_parameters": ["experts.w"]}, "target_parameters"),
    ("lora", {"init_lora_weights": "MiCA", "use_dora": True}, "DoraConfig.init must be one of 'kaiming', 'gaussian'"),
    ("dora", {"trainable_token_indices": [1, 2]}, "modules_to_save"),
    ("dora", {"init_lora_weights": "eva"}, "init='eva'"),
    ("dora", {"init_lora_weights": "corda"}, "init='corda'"),
    ("dora", {"init_lora_weights": "loftq"}, "init='loftq'"),
    ("lora", {"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'"),
    ("lora", {"init_lora_weights": "orthogonal"}, "olora"),
    ("lora", {"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ("lora", {"peft_type": "IA3"}, "from_peft_config"),
    ("lora", {"lora_alpha": 4, "alpha": 8}, "both set alpha"),
    ("lora", {"layers_pattern": ["h", "layers"]}, "one layers_pattern"),
    ("dora", {"use_dora": False}, "peftkit.config('lora'"),
    ("dora", {"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ("ia3", {"init_ia3_weights": False}, "init_ia3_weights"),
    ("prompt_tuning", {"tokenizer_kwargs": {"padding": True}}, "tokenizer_kwargs"),
    ("prompt_tuning", {"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ("prefix_tuning", {"init_weights": "zero"}, "init_weights"),
    ("randlora", {"init_weights": False}, "init_weights"),
]


@pytest.mark.parametrize("method,fields,fragment", REFUSED)
def test_unsupported_peft_options_are_refused_by_name(method: str, fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PeftkitError, match=None) as e:
        peftkit.config(method, **fields)
    assert fragment in str(e.value)


def test_peft_names_are_not_inherited_by_other_methods() -> None:
    """ExPLoRA's config subclasses LoRA's but is not PEFT's LoRA: use_dora must not turn it into DoRA (or LoRA)."""
    with pytest.raises(PeftkitError, match=r"ExploraConfig has no field\(s\) \['use_dora'\]"):
        peftkit.config("explora", target_modules=["q"], use_dora=False)
    assert peftkit.from_peft_config(peft.LoraConfig(target_modules=["q"])).method == "lora"


def test_peft_defaults_of_unsupported_options_are_accepted() -> None:
    """A full ``to_dict()`` of a default PEFT LoraConfig carries every option at its default: all accepted."""
    d = peft.LoraConfig(target_modules=["q"]).to_dict()
    assert {"lora_bias", "use_qalora", "megatron_core", "qalora_group_size", "loftq_config"} <= set(d)
    assert peftkit.config("lora", **d) == peftkit.config("lora", target_modules=["q"], init="kaiming")


def test_did_you_mean() -> None:
    with pytest.raises(PeftkitError, match=r"\['lora_alpah'\] \(did you mean 'lora_alpha'\?\)"):
        peftkit.config("lora", lora_alpah=16)
    with pytest.raises(PeftkitError, match=r"\['rslor'\] \(did you mean 'rslora'\?\)"):
        peftkit.LoraConfig(rslor=True)
    with pytest.raises(PeftkitError, match=r"unknown method 'lorra' \(did you mean 'lora'\?\)"):
        peftkit.config("lorra")
    with pytest.raises(PeftkitError, match=r"'IA_3' has no peftkit counterpart here \(did you mean 'IA3'\?\)"):
        peftkit.from_peft_config({"peft_type": "IA_3"})
    for spec in ("all_linear", ["all_linear"], "All-Linear"):
        with pytest.raises(PeftkitError, match=r"matched no module \(did you mean 'all-linear'\?\)"):
            peftkit.adapt(_bert(), peftkit.config("lora", target_modules=spec))


def test_cli_method_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import main

    assert main(["train", "--method", "lorra"]) != 0
    assert "did you mean 'lora'?" in capsys.readouterr().err


def test_task_type_adds_the_head_only_when_the_model_has_it() -> None:
    cfg = peftkit.config("lora", target_modules=["query"], task_type="SEQ_CLS")
    model = peftkit.adapt(_bert(), cfg)
    assert peftkit.get_config(model, "default").modules_to_save == ["classifier"]
    head = sum(p.numel() for p in _bert().classifier.parameters())
    assert _trainable(model) == 2 * 8 * (32 + 32) + head
    plain = nn.Sequential(nn.Linear(4, 4))
    peftkit.adapt(plain, peftkit.config("lora", target_modules=["0"], r=2, task_type="SEQ_CLS"))
    assert peftkit.get_config(plain, "default").modules_to_save is None
    again = peftkit.get_config(model, "default").resolve(model)  # idempotent
    assert again.modules_to_save == ["classifier"]


# -- init_lora_weights: the same starting point as PEFT ------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(24, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin(x)))


class _GapNet(_Net):
    """``lin`` with four dominant singular values: randomised SVD finds the same rank-4 subspace for any sketch."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
        v, _ = torch.linalg.qr(torch.randn(24, 16, generator=g))
        s = torch.cat([torch.tensor([9.0, 7.0, 5.0, 3.0]), torch.rand(12, generator=g) * 0.01])
        with torch.no_grad():
            self.lin.weight.copy_(u @ torch.diag(s) @ v.t())


def _start(init: Any, seed: int = 5, net: type[_Net] = _Net) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(peftkit, PEFT) initial lora_A, lora_B and base weight — peftkit's residual W0 − s·B0·A0 made explicit."""
    def make() -> Any:
        return peft.LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], init_lora_weights=init)

    torch.manual_seed(seed)
    ours = peftkit.adapt(net(), peftkit.from_peft_config(make()))
    torch.manual_seed(seed)
    pm = peft.get_peft_model(net(), make())
    ad = ours.lin.adapters["default"]
    w = ours.lin.base_layer.weight.detach()
    if getattr(ad, "pissa", False):
        w = w - ad.s * ad.pissa_B0 @ ad.pissa_A0
    layer = pm.base_model.model.lin
    theirs = {"A": layer.lora_A["default"].weight.detach(), "B": layer.lora_B["default"].weight.detach(),
              "W": layer.base_layer.weight.detach()}
    return {"A": ad.lora_A.detach(), "B": ad.lora_B.detach(), "W": w}, theirs


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_deterministic_inits_match_peft(init: str) -> None:
    ours, theirs = _start(init)
    for k in ("A", "B", "W"):
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4)
    assert not torch.equal(ours["W"], _Net().lin.weight.detach())  # the residual, not W0


def test_pissa_niter_matches_peft_up_to_the_random_sketch() -> None:
    """Randomised SVD: the factors' signs and the sketch differ with the RNG state, their product does not (to the
    subspace iteration's accuracy)."""
    ours, theirs = _start("pissa_niter_4", net=_GapNet)
    torch.testing.assert_close(ours["B"] @ ours["A"], theirs["B"] @ theirs["A"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours["W"], theirs["W"], atol=1e-4, rtol=1e-4)


def test_olora_and_pissa_keep_the_function() -> None:
    x = torch.randn(5, 24)
    base = _Net()(x)
    for init in ("olora", "pissa", "pissa_niter_2"):
        m = peftkit.adapt(_Net(), peftkit.config("lora", target_modules=["lin"], r=4, init_lora_weights=init))
        torch.testing.assert_close(m(x), base, atol=1e-5, rtol=1e-5)


def test_random_init_is_not_the_identity_and_true_is() -> None:
    x = torch.randn(5, 24)
    base = _Net()(x)
    ours, theirs = _start(False)
    assert ours["B"].abs().max() <= 1 / math.sqrt(4) and ours["B"].abs().min() > 0  # nn.Linear's init, fan_in r
    assert theirs["B"].abs().max() <= 1 / math.sqrt(4)
    m = peftkit.adapt(_Net(), peftkit.config("lora", target_modules=["lin"], r=4, init_lora_weights=False))
    assert not torch.allclose(m(x), base, atol=1e-4)
    ours_t, _ = _start(True)
    assert torch.count_nonzero(ours_t["B"]) == 0
    g, _ = _start("gaussian")
    assert 0.1 < float(g["A"].std()) < 0.5  # N(0, 1/r²): std 1/4


def test_random_init_exports_as_peft_false(tmp_path: Path) -> None:
    m = peftkit.adapt(_Net(), peftkit.config("lora", target_modules=["lin"], r=4, init_lora_weights=False))
    peftkit.save(m, tmp_path, format="hf")
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.init_lora_weights is False


# -- the README's Python API snippet (also in the notes) -----------------------------------------------------
README_SNIPPET = '''
from peftkit import LoraConfig            # was: from peft import LoraConfig

config = LoraConfig(
    r=8,
    lora_alpha=16,
    target_modules=["query", "value"],
    lora_dropout=0.05,
    task_type="SEQ_CLS",
)
'''


def test_readme_snippet_runs_and_matches_peft() -> None:
    scope: dict[str, Any] = {}
    exec(README_SNIPPET, scope)  # noqa: S102 - the documented snippet, verbatim
    ours = peftkit.adapt(_bert(), scope["config"])
    scope_peft: dict[str, Any] = {}
    exec(README_SNIPPET.replace("from peftkit import", "from peft import"), scope_peft)  # noqa: S102
    assert dataclasses.asdict(peftkit.from_peft_config(scope_peft["config"])) == dataclasses.asdict(scope["config"])
    pm = peft.get_peft_model(_bert(), scope_peft["config"])  # (PEFT adds its task head to the config object)
    assert _trainable(ours) == _trainable(pm)
    assert copy.deepcopy(scope["config"]) == scope["config"]


def test_inference_mode_adapts_frozen_as_peft_does(tmp_path: Any) -> None:
    """``inference_mode=True`` (what PEFT writes into every saved config) is accepted by ``from_peft_config``; the
    adapter is attached frozen, like ``get_peft_model`` with it, and ``load(..., trainable=True)`` trains it."""
    import peft
    import torch

    from conformance.models import MODELS

    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"], bias="all",
                         inference_mode=True)
    cfg = peftkit.from_peft_config(pc)
    assert cfg.inference_mode is True and cfg.r == 4
    model = MODELS["mlp"].build()
    peftkit.adapt(model, cfg)
    assert peftkit.summary(model).trainable == 0
    assert not any(p.requires_grad for p in model.parameters())
    ref = peft.get_peft_model(MODELS["mlp"].build(), pc)
    assert not any(p.requires_grad for n, p in ref.named_parameters() if "lora_" in n)
    peftkit.save(model, tmp_path / "a")
    for trainable, expect in ((False, False), (True, True)):
        fresh = MODELS["mlp"].build()
        peftkit.load(fresh, tmp_path / "a", trainable=trainable)
        lora = [p for n, p in fresh.named_parameters() if ".adapters." in n]
        assert lora and all(p.requires_grad is expect for p in lora)
        assert peftkit.get_config(fresh, "default").inference_mode is False  # `trainable` decides after a load
    plain = MODELS["mlp"].build()  # without it: trainable as before
    peftkit.adapt(plain, peftkit.from_peft_config(peft.LoraConfig(r=4, target_modules=["fc1"])))
    assert peftkit.summary(plain).trainable > 0 and isinstance(next(plain.parameters()), torch.Tensor)
