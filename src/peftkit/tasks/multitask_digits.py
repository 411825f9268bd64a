"""``peftkit train --task multitask-digits --method mtlora`` and ``peftkit eval`` of the saved multi-task model.

MTLoRA (Agiza et al. 2024, :mod:`peftkit.methods.mtlora`) on a hierarchical backbone: the pretrained
EfficientNet-Lite0 learns three tasks of scikit-learn's digits at once — ``digit`` (10-way), ``parity`` (even / odd)
and ``ge5`` (< 5 / ≥ 5). Every 1×1 convolution gets the task-agnostic LoRA; the last block of each of the backbone's
last four stages (strides 4, 8, 16, 32: blocks 2, 4, 10 and 15 of Lite0) gets a task-specific LoRA per task on its
1×1 convolutions. One forward runs the shared stream and the three task streams
(:func:`~peftkit.methods.mtlora.forward_tasks`); at each of those blocks the task streams restart from the shared
stream, and each stage's per-task output goes through the task's Downsampler, is fused across scales and classified
by the task's head (:class:`~peftkit.heads.mtlora_fusion.MultiTaskClassifier`). The loss is the sum of the three
cross-entropies. Before / after: held-out accuracy per task with the fresh heads (chance) and after training.

Saved: the adapter (``peftkit.save`` of the backbone) plus ``task_heads.safetensors`` (Downsamplers and heads), whose
sha256 ``train_info.json`` records; ``peftkit eval --adapter DIR`` rebuilds the backbone and heads and reproduces
every task's accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from . import Task, record, register_task
from .options import positive_int

TASK = "multitask-digits"
HEADS_FILE = "task_heads.safetensors"
#: task → (label of digit d, class names)
TASKS: dict[str, tuple[Any, list[str]]] = {
    "digit": (lambda d: d, [str(i) for i in range(10)]),
    "parity": (lambda d: d % 2, ["even", "odd"]),
    "ge5": (lambda d: int(d >= 5), ["<5", ">=5"]),
}
# measured on digits (1,438 train / 359 held-out), 64 px: see the note in the README
DEFAULTS = {"model": "efficientnet-lite0", "steps": 100, "lr": 1e-2, "batch_size": 32, "image_size": 32,
            "eval_size": 1000, "eval_batch_size": 128, "r": 8, "task_r": 4, "channels": 32, "hidden": 64,
            "max_stages": 4}
_NOT_HERE = (("quantize", "--quantize"), ("density_loss", "--density-loss"), ("max_length", "--max-length"),
             ("targets", "--targets"))


def add_flags(parser: argparse.ArgumentParser) -> None:
    shared = next((a for a in parser._actions if "--image-size" in a.option_strings), None)
    what = f"{TASK}: input side in pixels (default {DEFAULTS['image_size']})"
    if shared is None:  # image-classification registers --image-size too; one option, read by both
        parser.add_argument("--image-size", type=positive_int, metavar="PX", help=what)
    else:
        shared.help = f"{shared.help}; {what}"


def stage_layout(model: Any, max_stages: int = DEFAULTS["max_stages"]) -> tuple[list[str], list[int]]:
    """The last block of each resolution stage of an EfficientNet (the block before every stride-2 block, and the
    last block), at most the coarsest ``max_stages`` of them: (module names, output widths)."""
    blocks = list(model._blocks)
    ends = [i - 1 for i, b in enumerate(blocks) if b.stride != 1 and i > 0] + [len(blocks) - 1]
    ends = ends[-max_stages:]
    return [f"_blocks.{i}" for i in ends], [blocks[i]._project_conv.out_channels for i in ends]


def multitask_labels(digits: Any) -> Any:
    import torch

    return torch.stack([torch.tensor([fn(int(d)) for d in digits]) for fn, _ in TASKS.values()], dim=1)


def build(backbone: Any, stages: list[str], dims: list[int]) -> Any:
    from ..heads.mtlora_fusion import MultiTaskClassifier

    return MultiTaskClassifier(backbone, stages, dims, {t: len(n) for t, (_, n) in TASKS.items()},
                               channels=DEFAULTS["channels"], hidden=DEFAULTS["hidden"])


class _Batches:
    """``{"images", "labels" [B, 3]}`` batches over digit images (the per-task labels made from the digit)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        for x, y in self.inner:
            yield {"images": x, "labels": multitask_labels(y)}


def accuracies(net: Any, batches: Any, device: Any) -> dict[str, tuple[float, int, int]]:
    import torch

    correct = dict.fromkeys(TASKS, 0)
    n = 0
    net.eval()
    with torch.no_grad():
        for b in batches:
            logits = net(b["images"].to(device))["logits"]
            for i, t in enumerate(TASKS):
                correct[t] += int((logits[t].argmax(-1).cpu() == b["labels"][:, i]).sum())
            n += len(b["labels"])
    return {t: (c / n, c, n) for t, c in correct.items()}


def _line(accs: dict[str, tuple[float, int, int]]) -> str:
    return ", ".join(f"{t} {record.acc_line(a)}" for t, a in accs.items())


def _digits(source: str | None, names: list[str] | None = None) -> Any:
    from ..data.images import load_image_data

    data = load_image_data(source, names)
    if data.label_names != [str(i) for i in range(10)]:
        raise PeftkitError(f"{data.source}: --task {TASK} needs the ten digits 0..9 as labels, got "
                           f"{data.label_names}")
    return data


def train(args: argparse.Namespace) -> int:
    for key, flag in _NOT_HERE:
        if getattr(args, key, None) is not None:
            raise PeftkitError(f"{flag} does not apply to --task {TASK}")
    if args.method != "mtlora":
        raise PeftkitError(f"--task {TASK} trains MTLoRA's task streams: use --method mtlora (got {args.method!r})")
    from ..models.efficientnet import DEFAULT_TARGETS, check_backbone

    model_name = check_backbone(args.model or DEFAULTS["model"])
    # the 1×1 convolutions inside the blocks; not _conv_head: it comes after the last stage, on no task's path
    args.targets = ",".join(t for t in DEFAULT_TARGETS if t != "_conv_head")
    from .run import TrainRun

    run = TrainRun(args, DEFAULTS, tag="mtl")
    given = {k: run.cfg_fields[k] for k in ("tasks", "task_modules") if k in run.cfg_fields}
    if given:
        raise PeftkitError(f"--opt {next(iter(given))}: --task {TASK} sets the tasks ({', '.join(TASKS)}) and their "
                           f"modules (the stage-end blocks) itself")
    size = DEFAULTS["image_size"] if getattr(args, "image_size", None) is None else args.image_size
    if size < 8:
        raise PeftkitError(f"--image-size must be >= 8 pixels, got {size}")
    data = _digits(args.data)
    from ..data.images import ImageBatches
    from ..data.text import split_indices

    train_idx, eval_idx = split_indices(len(data), run.eval_size(len(data)), args.split_seed)
    import hashlib

    import torch
    from safetensors.torch import save

    from ..models import model_label
    from ..models.efficientnet import build_backbone

    torch.manual_seed(args.seed)
    backbone = build_backbone(model_name, 10)
    stages, dims = stage_layout(backbone)
    blocks = [backbone.get_submodule(s) for s in stages]
    run.cfg_fields.update(tasks=list(TASKS), task_modules=[
        f"{s}.{c}" for s, b in zip(stages, blocks) for c in ("_expand_conv", "_project_conv") if hasattr(b, c)])
    for key in ("r", "task_r"):
        run.cfg_fields.setdefault(key, DEFAULTS[key])
    _, procedures = run.adapt(backbone, heads=[])
    torch.manual_seed(args.seed)
    net = build(backbone, stages, dims).to(run.device)
    train_set, eval_set = data.subset(train_idx), data.subset(eval_idx)
    train_batches = run.batches(lambda b: _Batches(ImageBatches(train_set, b, size, shuffle=True, seed=args.seed)))
    eval_batches = _Batches(ImageBatches(eval_set, DEFAULTS["eval_batch_size"], size, shuffle=False))
    steps = run.steps(len(train_batches), default_steps=DEFAULTS["steps"])  # type: ignore[arg-type]
    head_params = sum(p.numel() for n, p in net.named_parameters() if p.requires_grad and not n.startswith("backbone."))
    run.describe(backbone, f"{model_label(model_name)} — {len(TASKS)} tasks ({', '.join(TASKS)}), {size}×{size} "
                           f"inputs", [f"data: {data.source} — {len(train_idx):,} train / {len(eval_idx):,} held-out "
                                       f"(split seed {args.split_seed})",
                                       f"task streams restart and feed the fusion at {', '.join(stages)} (widths "
                                       f"{', '.join(map(str, dims))}); Downsamplers + heads: {head_params:,} "
                                       f"parameters"])
    before = accuracies(net, eval_batches, run.device)
    print(f"held-out accuracy before: {_line(before)}")
    run.train(net, train_batches, steps, procedures, unit="images", inputs=f"{size}×{size} images, "
              f"{len(TASKS) + 1} streams")
    after = accuracies(net, eval_batches, run.device)
    print(f"held-out accuracy after:  {_line(after)}")
    heads = {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    blob = save({k: v.detach().cpu().contiguous() for k, v in heads.items()}, metadata={"format": "pt"})
    run.output.mkdir(parents=True, exist_ok=True)
    from ..core.io import atomic_write_bytes

    atomic_write_bytes(run.output / HEADS_FILE, blob)  # first; train_info.json (written with the adapter) names it
    return run.finish(backbone, TASK, model_name, {
        "data": data.source, "label_names": data.label_names, "tasks": {t: n for t, (_, n) in TASKS.items()},
        "stages": stages, "stage_dims": dims, "image_size": size, "eval_size": len(eval_idx),
        "train_examples": len(train_idx), "eval_batch_size": DEFAULTS["eval_batch_size"],
        "task_head_params": head_params, "task_heads_sha256": hashlib.sha256(blob).hexdigest(),
        **{f"accuracy_before_{t}": a[0] for t, a in before.items()},
        **{f"accuracy_after_{t}": a[0] for t, a in after.items()},
        **{f"correct_after_{t}": a[1] for t, a in after.items()},
    })


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Per-task held-out (or ``--data FILE.npz``) accuracy of a saved multi-task model, compared with the accuracies
    recorded after training."""
    import hashlib

    adapter = Path(args.adapter)
    record.check_train_info(adapter, info, need=("image_size", "stages", "stage_dims", "task_heads_sha256"))
    if info.get("tasks") != {t: n for t, (_, n) in TASKS.items()}:
        raise PeftkitError(f"{adapter / record.TRAIN_INFO}: tasks must be {list(TASKS)}, got "
                           f"{str(info.get('tasks'))[:80]}")
    heads_path = adapter / HEADS_FILE
    if not heads_path.is_file():
        raise PeftkitError(f"{adapter} has no {HEADS_FILE}")
    blob = heads_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != info["task_heads_sha256"]:
        raise PeftkitError(f"{heads_path} is not the one this run saved (its sha256 differs from {record.TRAIN_INFO})")
    from .run import eval_device, set_threads

    device = eval_device(args)
    set_threads(args.threads if args.threads is not None else info.get("threads"))
    data = _digits(args.data if args.data is not None else info["data"])
    if args.data is not None:
        subset, what = data, f"all of {data.source}"
    else:
        from ..data.text import split_indices

        _, eval_idx = split_indices(len(data), int(info["eval_size"]), int(info["split_seed"]))
        subset, what = data.subset(eval_idx), f"the held-out split of {data.source}"
    import torch
    from safetensors.torch import load

    from ..data.images import ImageBatches
    from ..models.efficientnet import build_backbone, check_backbone

    torch.manual_seed(int(info["seed"]))
    backbone = build_backbone(check_backbone(info["model"]), 10)
    stages, dims = stage_layout(backbone)  # of the plain backbone (an adapted conv is wrapped)
    record.load_for_eval(backbone, adapter, None, what)
    if stages != info["stages"] or dims != info["stage_dims"]:
        raise PeftkitError(f"{info['model']}'s stages {stages} are not the ones the run used: {info['stages']}")
    net = build(backbone, stages, dims)
    try:
        net.load_state_dict({**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **load(blob)},
                            strict=True)
    except RuntimeError as e:
        raise PeftkitError(f"{heads_path} does not fit the task heads: {str(e).splitlines()[0][:200]}") from None
    net.to(device)
    batches = _Batches(ImageBatches(subset, int(info.get("eval_batch_size", DEFAULTS["eval_batch_size"])),
                                    int(info["image_size"]), shuffle=False))
    accs = accuracies(net, batches, device)
    print(f"accuracy: {_line(accs)} on {what}")
    if args.data is None and all(f"correct_after_{t}" in info for t in TASKS):
        bad = []
        for t, a in accs.items():
            rec = info[f"correct_after_{t}"]
            verdict = record.reproduction_verdict(rec, a[1], a[2], quantized=False,
                                                  other_device=record.other_device(info, device))
            print(f"recorded after training, {t}: {record.acc_line((rec / a[2], rec, a[2]))} — {verdict}")
            if verdict.startswith("DIFFERENT"):
                bad.append(t)
        if bad:
            raise PeftkitError(f"not reproduced: {', '.join(bad)} accuracy differs from what training recorded")
    return 0


register_task(Task(TASK, "multitask-digits: MTLoRA on EfficientNet-Lite0, three digit tasks with per-task streams "
                         "and fused multi-scale heads", DEFAULTS, train, evaluate, add_flags=add_flags,
                   own_flags=(("image_size", "--image-size"),), order=6))
