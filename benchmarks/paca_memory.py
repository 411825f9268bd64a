"""Activation memory of a PaCA training step vs a LoRA step at equal trainable parameters.

all-MiniLM-L6-v2 architecture, batch 16, sequence 128, every Linear of the encoder and pooler adapted, fp32,
2 threads. LoRA r=8 has r·(d_in + d_out) parameters per layer; PaCA has r'·d_out, so the PaCA rank per layer is
r' = 8·(d_in + d_out)/d_out (16 for the 384×384 layers, 10 for the FFN up-projection, 40 for the down-projection):
the same 337,920 trainable parameters. Each setup runs in a fresh process (with a fixed glibc mmap threshold so that
resident memory follows live tensors) and reports:

* the bytes of tensors autograd keeps for backward (parameters excluded, distinct storages) — PaCA saves the r'
  selected input features; LoRA's fused kernel keeps the whole input only where its producer cannot rebuild it
  (``core/saved_input.py``: on BERT only the attention-output projection's input), so on 2026-11-30 the two
  measured 423 vs 440 MiB saved (0.96) and 445 vs 459 MiB step peak (0.97) — before that change LoRA kept every
  adapted layer's input (545 MiB);
* the rise of peak RSS during one training step over the RSS before it.

    python benchmarks/paca_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lora_vs_peft as common  # noqa: E402  (same model, batch and measurement helpers)

PACA_RANKS = {"r": 16, "overrides": {r"intermediate\.dense": {"r": 10}, r"layer\.\d+\.output\.dense": {"r": 40}}}


def child(kind: str) -> dict[str, Any]:
    import peftkit

    torch.set_num_threads(2)
    model = common._base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    if kind == "lora":
        cfg = peftkit.config("lora", target_modules=common.TARGETS, r=8, alpha=16)
    else:
        cfg = peftkit.config("paca", target_modules=common.TARGETS, **PACA_RANKS)
    peftkit.adapt(model, cfg)
    with torch.no_grad():  # a trained-looking adapter (LoRA's B is zero at init)
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.01)
    n_train = sum(p.numel() for p in peftkit.trainable_parameters(model))
    step = common.trainer(model)
    step()
    saved = common._saved_tensor_bytes(model, common.batch())
    step()
    rss = common._status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    peak = common._status_kb("VmHWM")
    return {"kind": kind, "trainable": n_train, "saved_tensor_mib": saved / 2**20, "step_peak_mib": (peak - rss) / 1024}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    res = {}
    for kind in ("lora", "paca"):
        out = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True, check=True,
                             env=env)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    lo, pa = res["lora"], res["paca"]
    print(f"trainable parameters: LoRA {lo['trainable']:,}, PaCA {pa['trainable']:,}")
    print(f"tensors saved for backward: LoRA {lo['saved_tensor_mib']:.0f} MiB, PaCA {pa['saved_tensor_mib']:.0f} MiB "
          f"→ ratio {pa['saved_tensor_mib'] / lo['saved_tensor_mib']:.3f}")
    print(f"training-step peak RSS rise: LoRA {lo['step_peak_mib']:.0f} MiB, PaCA {pa['step_peak_mib']:.0f} MiB "
          f"→ ratio {pa['step_peak_mib'] / lo['step_peak_mib']:.3f}")


if __name__ == "__main__":
    main()
