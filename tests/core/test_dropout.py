"""Dropout is one core rule for every method (:func:`peftkit.core.adapter.make_dropout`): it acts on float tensors
and passes token ids through, so a method's input dropout on an Embedding host is skipped — as Hugging Face PEFT's
LoRA skips ``lora_dropout`` on an Embedding — instead of crashing in training (MTLoRA did) or being refused by
some methods and not others."""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from conformance.models import MODELS, matrix_config_fields, perturb
from peftkit.core.adapter import InputDropout, make_dropout
from peftkit.core.registry import all_methods

EMB = MODELS["embedding"]


def _embedding_methods_with_dropout() -> list[str]:
    out = []
    for info in all_methods():
        if info.model_level or "embedding" not in info.hosts:
            continue
        try:
            info.config.from_dict({**matrix_config_fields(info.name, EMB), "dropout": 0.3})
        except peftkit.PeftkitError:  # a method without dropout (e.g. IA3) refuses dropout > 0 in its config
            continue
        out.append(info.name)
    return out


METHODS = _embedding_methods_with_dropout()


def test_the_methods_the_issue_names_are_covered() -> None:
    assert {"lora", "mtlora"} <= set(METHODS)
    assert len(METHODS) >= 10


def test_input_dropout_passes_token_ids_and_drops_floats() -> None:
    d = make_dropout(0.5).train()
    assert isinstance(d, InputDropout)
    ids = torch.arange(12).reshape(3, 4)
    assert d(ids) is ids
    torch.manual_seed(0)
    x = torch.ones(1000)
    y = d(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}  # inverted dropout on floats
    assert isinstance(make_dropout(0.0), torch.nn.Identity)


@pytest.mark.parametrize("method", METHODS)
def test_dropout_on_an_embedding_trains(method: str) -> None:
    info = peftkit.get_method(method)
    model = EMB.build()
    cfg = info.config.from_dict({**matrix_config_fields(method, EMB), "dropout": 0.3})
    torch.manual_seed(1)
    peftkit.adapt(model, cfg)  # accepted at adapt time (no method refuses it on its own any more)
    perturb(model, seed=3)
    x = EMB.input()
    model.train()
    out = EMB.run(model, x)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert math.isfinite(float(out.detach().abs().sum()))


@pytest.mark.parametrize("method", [m for m in ("lora", "dora", "mtlora") if m in METHODS])
def test_input_dropout_is_skipped_on_an_embedding(method: str) -> None:
    """LoRA-style methods drop only their input: on an Embedding that is token ids, so train mode computes what eval
    mode does (PEFT's LoRA Embedding never applies lora_dropout either)."""
    info = peftkit.get_method(method)
    model = EMB.build()
    torch.manual_seed(1)
    peftkit.adapt(model, info.config.from_dict({**matrix_config_fields(method, EMB), "dropout": 0.5}))
    perturb(model, seed=3)
    x = EMB.input()
    with torch.no_grad():
        base = model.emb.base_layer(x) if hasattr(model.emb, "base_layer") else None
        model.eval()
        y_eval = EMB.run(model, x)
        model.train()
        y_train = EMB.run(model, x)
    assert torch.equal(y_train, y_eval)  # same code, same inputs: no random mask was drawn
    if base is not None:
        assert not torch.equal(model.emb(x), base)  # the adapter does contribute


@pytest.mark.parametrize("method", ["mos", "randlora", "polyhistor"])
def test_shared_tensor_adapters_need_peftkit_adapt(method: str) -> None:
    """Adapters whose layers share tensors are built by ``peftkit.adapt`` (one core check, ``require_context``)."""
    from peftkit.core.host import Host

    info = peftkit.get_method(method)
    model = MODELS["mlp"].build()
    cfg = info.config.from_dict(matrix_config_fields(method, MODELS["mlp"]))
    with pytest.raises(peftkit.PeftkitError, match="adapters are built by peftkit.adapt"):
        info.adapter(Host(model.fc1, "fc1"), cfg)
