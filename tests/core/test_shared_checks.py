"""The small shared pieces several methods use instead of their own copies: the calibration-Gram check, the lookup
of one adapter's layers by class, the adapter parameter dtype of a host, the config range checks, and PEFT's
method-specific bias / init_weights aliases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import MODELS
from peftkit.core.calibration import checked_gram
from peftkit.core.config import AdapterConfig
from peftkit.core.host import Host
from peftkit.core.peft_names import INIT_IDENTITY, bias_alias
from peftkit.core.procedure import adapter_layers
from peftkit.methods.lora import Lora


def test_checked_gram_symmetrises_in_float64_and_refuses_bad_input() -> None:
    host = Host(nn.Linear(3, 2), "fc")
    g = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = checked_gram(host, g)
    assert out.dtype == torch.float64 and torch.equal(out, out.t()) and float(out[0, 1]) == 0.5
    with pytest.raises(peftkit.PeftkitError, match=r"module 'fc': the calibration Gram must be a finite \(3, 3\)"):
        checked_gram(host, torch.eye(4))
    with pytest.raises(peftkit.PeftkitError, match="must be a finite"):
        checked_gram(host, torch.full((3, 3), float("nan")))
    with pytest.raises(peftkit.PeftkitError, match="module 'fc': the calibration Gram is zero"):
        checked_gram(host, torch.zeros(3, 3))


def test_adapter_layers_finds_one_adapter_of_a_class_and_names_what_is_wrong() -> None:
    model = MODELS["mlp"].build()
    with pytest.raises(peftkit.PeftkitError, match=r"who: 0 Lora adapters loaded \(\[\]\); say which one"):
        adapter_layers(model, Lora, None, "who")
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1", "fc2"]))
    name, layers = adapter_layers(model, Lora, None, "who")
    assert name == "default" and [p for p, _ in layers] == ["fc1", "fc2"]
    assert all(isinstance(a, Lora) for _, a in layers)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1"]), name="second")
    with pytest.raises(peftkit.PeftkitError, match=r"2 Lora adapters loaded \(\['default', 'second'\]\)"):
        adapter_layers(model, Lora, None, "who")
    assert [p for p, _ in adapter_layers(model, Lora, "second", "who")[1]] == ["fc1"]
    with pytest.raises(peftkit.PeftkitError, match=r"who: no Lora adapter named 'third'"):
        adapter_layers(model, Lora, "third", "who")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_param_dtype_follows_a_float_weight(dtype: torch.dtype) -> None:
    assert Host(nn.Linear(4, 3).to(dtype), "fc").param_dtype == dtype


def test_range_checks_name_the_field() -> None:
    AdapterConfig.at_least("X.k", 2, 2)
    AdapterConfig.positive_int("X.r", 1)
    with pytest.raises(peftkit.PeftkitError, match=r"^X\.k must be >= 2, got 1$"):
        AdapterConfig.at_least("X.k", 1, 2)
    with pytest.raises(peftkit.PeftkitError, match=r"^X\.r must be a positive integer, got 0$"):
        AdapterConfig.positive_int("X.r", 0)


def test_peft_bias_and_init_aliases() -> None:
    alias = bias_alias("boft_only")
    assert alias.field == "bias"
    assert [alias.value(v, {}) for v in ("boft_only", "all", "none")] == ["adapter_only", "all", "none"]
    assert INIT_IDENTITY.field == "init"
    assert (INIT_IDENTITY.value(True, {}), INIT_IDENTITY.value(False, {})) == ("identity", "random")
