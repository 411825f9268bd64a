"""The bench's timing pass: one method's training-step time and peak memory on a fixed batch, in a fresh process.

    python -m peftkit.bench.timing '{"method": "lora", "model": DIR, "labels": 2, "batch_size": 32,
                                    "max_length": 64, "threads": 2, "steps": 8, "seed": 0, "opts": {}}'

prints one JSON line ``{"method", "step_seconds", "step_peak_mib"}``. The model is adapted the way ``peftkit
train`` adapts it (the method's default targets, else all-linear; the classification head trained in full; the
method's training procedure attached) and trained by the project's own loop on one fixed batch of random token ids
(``batch_size`` × ``max_length``, no padding): two warm-up steps, then the peak-RSS rise of the third step
(optimiser state already allocated: activations, gradients and temporaries of one step), then the median wall time
of ``steps`` further steps. Data-aware initialisation (``calibrate``) is skipped: it changes adapter values, not
step cost. Run it with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set (the runner does) so that freed
tensors leave the resident set, and with passive OpenMP waiting (the runner's default), on an otherwise idle machine.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError
from ..core.procedure import Procedure


class _Stopwatch:
    """Step start and end times, and the peak-RSS rise of step ``peak_step`` (reset before its forward pass, read
    after its optimiser step). Its two :class:`_Edge` procedures go first and last in the trainer's list."""

    def __init__(self, peak_step: int) -> None:
        self.peak_step, self.stamps, self.rss, self.peak_mib = peak_step, {}, None, None
        self.start, self.end = _Edge(self, 0), _Edge(self, 1)

    def mark(self, step: int, edge: int) -> None:
        from ..train.trainer import peak_memory_since, reset_peak_memory

        if edge == 1 and step == self.peak_step:
            self.peak_mib = peak_memory_since(self.rss)
        self.stamps.setdefault(step, [0.0, 0.0])[edge] = time.perf_counter()
        if edge == 0 and step == self.peak_step:
            self.rss = reset_peak_memory()

    def seconds(self, steps: range) -> list[float]:
        return [self.stamps[i][1] - self.stamps[i][0] for i in steps]


class _Edge(Procedure):
    def __init__(self, watch: _Stopwatch, edge: int) -> None:
        self.watch, self.edge = watch, edge

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self.edge == 0:
            self.watch.mark(step, 0)

    def on_step_end(self, model: nn.Module, step: int, optimizer: Any = None) -> None:
        if self.edge == 1:
            self.watch.mark(step, 1)


def kept_storages(out: torch.Tensor) -> dict[int, int]:
    """The storages (data pointer -> bytes) that the autograd graph of ``out`` keeps for backward: every node's
    ``_saved_*`` tensors and a custom Function's ``saved_tensors``, found by walking the graph — no saved-tensor hook
    in force, so what is measured is what runs (a hook would change it: see ``core/saved_input.py``)."""
    seen: dict[int, int] = {}

    def note(t: Any) -> None:
        if isinstance(t, (tuple, list)):
            for v in t:
                note(v)
        elif isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    note(getattr(node, name))
                except RuntimeError:  # declared but not saved (conditional saving)
                    pass
        note(getattr(node, "saved_tensors", ()))
        stack.extend(fn for fn, _ in node.next_functions)
    return seen


def _parse(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def measure(method: str, model: str, *, labels: int = 2, batch_size: int = 32, max_length: int = 64,
            threads: int | None = 2, steps: int = 8, seed: int = 0, lr: float = 2e-3,
            opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median training-step seconds and the peak-RSS rise (MiB) of one step of ``method`` (a registered name or a
    ``name/variant``) on the classifier in folder ``model``; see the module docstring."""
    import peftkit
    from peftkit.models import classifier_head_names, load_classifier
    from peftkit.train.trainer import method_procedures, train

    from .options import base_method

    if threads is not None:
        torch.set_num_threads(threads)
    info = peftkit.get_method(base_method(method))
    net, _ = load_classifier(model, labels, seed=seed)
    fields: dict[str, Any] = {k: _parse(v) for k, v in (opts or {}).items()}
    if not info.model_level and "target_modules" not in fields:  # as `peftkit train`: own default, else all-linear
        own = next(f.default for f in dataclasses.fields(info.config) if f.name == "target_modules")
        fields["target_modules"] = own if isinstance(own, str) else "all-linear"
    fields.setdefault("modules_to_save", classifier_head_names(net) or None)
    cfg = info.config.from_dict(fields)
    torch.manual_seed(seed)
    peftkit.adapt(net, cfg)
    vocab = int(net.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(min(1000, vocab // 2), min(20000, vocab), (batch_size, max_length),
                                        generator=g),
             "attention_mask": torch.ones(batch_size, max_length, dtype=torch.long),
             "labels": torch.randint(0, labels, (batch_size,), generator=g)}
    watch = _Stopwatch(peak_step=2)
    train(net, [batch], steps=3 + steps, lr=lr, warmup=0, procedures=[watch.start, *method_procedures(info, net, cfg),
                                                                      watch.end], progress=False)
    return {"method": method, "step_seconds": statistics.median(watch.seconds(range(3, 3 + steps))),
            "step_peak_mib": watch.peak_mib}


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        print(json.dumps(measure(spec.pop("method"), spec.pop("model"), **spec)))
    except PeftkitError as e:
        print(f"peftkit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
