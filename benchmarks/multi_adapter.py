"""Serving many LoRA adapters in one batch: peftkit's mixed batch vs one adapter, and Hugging Face PEFT's
``adapter_names=`` for comparison.

Setup: all-MiniLM-L6-v2 sequence classifier (``peftkit.models.load_classifier(default_model_dir(), 2, seed=0)``),
eval mode, ``torch.inference_mode``, fp32, batch 32 × 64 tokens. 8 LoRA adapters of ranks 4/8/16 (α = 2r) on every
Linear of the encoder (query, key, value, dense), B random so the low-rank path does real work. Configurations:

* ``pk_one`` / ``pk_one_again``: peftkit, one active adapter for the whole batch (the fused single-adapter path);
  the two are identical and their ratio is the measurement noise of this run;
* ``pk_mixed8``: peftkit ``mixed_batch`` with sample i on adapter i mod 8 (the gathered batched-matmul path);
* ``pk_mixed8_loop``: the same batch through the one-``delta``-per-adapter path (the batched hook switched off);
* ``peft_one`` / ``peft_mixed2`` / ``peft_mixed8``: Hugging Face PEFT, one adapter, then ``adapter_names=`` with 2
  and with 8 adapters.

All configurations live in one process and are timed in interleaved rounds (round k runs each configuration for
``--steps`` forwards, the order rotating every round); each figure is the median over rounds of the per-round mean.

    python benchmarks/multi_adapter.py [--rounds 7] [--steps 3] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

BATCH, SEQ = 32, 64
RANKS = [4, 8, 16, 4, 8, 16, 4, 8]
TARGETS = ["query", "key", "value", "dense"]


def _model() -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from peftkit.models import default_model_dir, load_classifier

    transformers.logging.set_verbosity_error()
    model, _ = load_classifier(default_model_dir(), 2, seed=0)
    return model.eval()


@torch.no_grad()
def _randomise(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_peftkit() -> tuple[torch.nn.Module, list[str]]:
    import peftkit

    model = _model()
    names = [f"ad{i}" for i in range(len(RANKS))]
    for i, (n, r) in enumerate(zip(names, RANKS)):
        peftkit.adapt(model, peftkit.config("lora", target_modules=TARGETS, r=r, alpha=2 * r), name=n)
        _randomise([p for k, p in model.named_parameters() if f"adapters.{n}." in k], seed=i)
    peftkit.set_active(model, names[0], trainable=False)
    return model.eval(), names


def build_peft() -> tuple[torch.nn.Module, list[str]]:
    from peft import LoraConfig, get_peft_model

    names = [f"ad{i}" for i in range(len(RANKS))]
    model = None
    for i, (n, r) in enumerate(zip(names, RANKS)):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
        if model is None:
            model = get_peft_model(_model(), cfg, adapter_name=n)
        else:
            model.add_adapter(n, cfg)
        _randomise([p for k, p in model.named_parameters() if f".{n}." in k and "lora_" in k], seed=i)
    model.set_adapter(names[0])
    return model.eval(), names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "multi_adapter.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import peftkit
    from peftkit.core.lowrank import LowRankUpdate

    pk, names = build_peftkit()
    hf, hf_names = build_peft()
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mixed8 = [names[i % 8] for i in range(BATCH)]
    hf_mixed2 = [hf_names[i % 2] for i in range(BATCH)]
    hf_mixed8 = [hf_names[i % 8] for i in range(BATCH)]

    def pk_one() -> None:
        pk(input_ids=ids, attention_mask=mask)

    def pk_mixed() -> None:
        with peftkit.mixed_batch(pk, mixed8):
            pk(input_ids=ids, attention_mask=mask)

    def pk_loop() -> None:
        orig = LowRankUpdate.__dict__["batched_delta"]
        LowRankUpdate.batched_delta = classmethod(lambda cls, *args: None)
        try:
            pk_mixed()
        finally:
            LowRankUpdate.batched_delta = orig

    configs: dict[str, Callable[[], None]] = {
        "pk_one": pk_one,
        "pk_one_again": pk_one,
        "pk_mixed8": pk_mixed,
        "pk_mixed8_loop": pk_loop,
        "peft_one": lambda: hf(input_ids=ids, attention_mask=mask),
        "peft_mixed2": lambda: hf(input_ids=ids, attention_mask=mask, adapter_names=hf_mixed2),
        "peft_mixed8": lambda: hf(input_ids=ids, attention_mask=mask, adapter_names=hf_mixed8),
    }
    with torch.inference_mode():  # sanity: the mixed batch matches each sample's adapter alone (first and last)
        with peftkit.mixed_batch(pk, mixed8):
            y = pk(input_ids=ids, attention_mask=mask).logits
        for i in (0, BATCH - 1):
            peftkit.set_active(pk, mixed8[i], trainable=False)
            ref = pk(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            assert torch.allclose(y[i:i + 1], ref, atol=1e-4), (i, y[i], ref)
        peftkit.set_active(pk, names[0], trainable=False)
        for f in configs.values():  # warm-up
            f()
        times: dict[str, list[float]] = {k: [] for k in configs}
        order = list(configs)
        for k in range(args.rounds):
            rot = order[k % len(order):] + order[:k % len(order)]
            for name in rot:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    configs[name]()
                times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "peftkit mixed 8 adapters / one adapter": med["pk_mixed8"] / med["pk_one"],
        "peftkit mixed 8, per-adapter loop / one adapter": med["pk_mixed8_loop"] / med["pk_one"],
        "noise: peftkit one adapter / identical config": med["pk_one_again"] / med["pk_one"],
        "peft mixed 2 adapters / one adapter": med["peft_mixed2"] / med["peft_one"],
        "peft mixed 8 adapters / one adapter": med["peft_mixed8"] / med["peft_one"],
        "peftkit mixed 8 / peft mixed 8": med["pk_mixed8"] / med["peft_mixed8"],
    }
    print(f"batch {BATCH} x {SEQ} tokens, ranks {RANKS}, targets {TARGETS}, threads {args.threads}, "
          f"{args.rounds} rounds x {args.steps} forwards")
    for k, v in med.items():
        print(f"  {k:<16} {1000 * v:8.1f} ms / forward (median)")
    for k, v in ratios.items():
        print(f"  {k:<50} {v:.3f}x")
    out = {"setup": {"batch": BATCH, "seq": SEQ, "ranks": RANKS, "targets": TARGETS, "threads": args.threads,
                     "rounds": args.rounds, "steps": args.steps, "torch": torch.__version__},
           "median_seconds": med, "all_seconds": times, "ratios": ratios}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
