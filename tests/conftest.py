"""Shared tiny-model fixtures. The models themselves live in ``tests/conformance/models.py`` (one definition for
the conformance matrix and the method / core tests); this file puts ``tests/`` on the import path so that every
test module can ``from conformance.models import ...`` whatever pytest import mode is used."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conformance.models import MODELS, TinyModel  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(params=sorted(n for n, m in MODELS.items() if not {"norm", "conv3d"} & set(m.hosts)))
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    """Each tiny weight-matrix host model spec in turn (not the norm-layer model, which only norm methods adapt, nor
    the Conv3d one, which a few methods adapt)."""
    return MODELS[request.param]


@pytest.fixture
def mlp_spec() -> TinyModel:
    return MODELS["mlp"]


@pytest.fixture
def mlp() -> torch.nn.Module:
    """MLP(16 -> 32 -> 16 -> head 4), eval mode, seeded."""
    return MODELS["mlp"].build()


@pytest.fixture
def block() -> torch.nn.Module:
    """Transformer block on (B, 5, 16): attn.{q,k,v,o}, mlp.{fc1,fc2}."""
    return MODELS["block"].build()


@pytest.fixture
def conv2d_net() -> torch.nn.Module:
    return MODELS["conv2d"].build()


@pytest.fixture
def emb_model() -> torch.nn.Module:
    return MODELS["embedding"].build()


@pytest.fixture
def gpt2() -> torch.nn.Module:
    return MODELS["gpt2"].build()
