"""Bytes the autograd graph of one LoRA training forward keeps for backward (parameters excluded), peftkit vs
Hugging Face PEFT — a deterministic memory measure (no timing), on the setups of ``lora_vs_peft.py``: MiniLM
(BERT, 6 layers, batch 16 × 128) and a SmolLM2-135M-shaped Llama reduced to ``--llama-layers`` layers (batch 4 × 256),
fp32 and bf16 autocast.

    PYTHONPATH=src python benchmarks/kept_for_backward.py [--models minilm smollm2] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_vs_peft as bench  # noqa: E402


def kept_mib(kind: str, setup: bench.Setup) -> float:
    model = bench.build(kind, setup)
    model.train()
    saved = bench._saved_tensor_bytes(model, None, setup)
    assert saved is not None
    return saved / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(bench.SHAPES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--llama-layers", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bench.SHAPES["smollm2"] = dataclasses.replace(bench.SHAPES["smollm2"], layers=args.llama_layers)
    for model in args.models:
        for prec in args.precisions:
            setup = bench.Setup(model=model, precision=prec)
            ours, peft = kept_mib("peftkit", setup), kept_mib("peft", setup)
            print(f"{setup.name}: kept for backward peftkit {ours:.1f} MiB, peft {peft:.1f} MiB, "
                  f"ratio {ours / peft:.3f}", flush=True)


if __name__ == "__main__":
    main()
