"""Graph breaks under ``torch.compile``: peftkit vs Hugging Face PEFT on a tiny BERT and a tiny Llama.

For each library and method (LoRA, DoRA, IA3; ``--all`` adds every other peftkit method that adapts Linear layers,
with its default config) the adapted model is put in training mode and traced by ``torch._dynamo.explain`` on one
batch: the table gives the number of graphs, the graph breaks, and the breaks whose stack passes through the adapter
library's own code (``inside``: what the library is responsible for; the rest come from the model). ``fullgraph``
says whether ``torch.compile(model, fullgraph=True, backend="aot_eager")`` runs a forward and a backward.
Counting, not timing: the numbers do not depend on the machine's load.

    python benchmarks/graph_breaks.py [--all] [--json out.json]

To compare with an older peftkit, run it with that version first on the path (``PYTHONPATH=<old>/src``).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FEEDFORWARD = {"bert": ["output.dense"], "llama": ["down_proj"]}


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=None))


ARCHS = {"bert": (_bert, BERT_TARGETS), "llama": (_llama, LLAMA_TARGETS)}


def _peftkit(arch: str, method: str) -> torch.nn.Module:
    import peftkit

    build, targets = ARCHS[arch]
    model = build()
    fields: dict[str, Any] = {"target_modules": targets}
    if method == "ia3":
        fields["feedforward_modules"] = FEEDFORWARD[arch] if arch == "llama" else ["dense"]
    peftkit.adapt(model, peftkit.config(method, **fields))
    return model


def _peft(arch: str, method: str) -> torch.nn.Module:
    import peft

    build, targets = ARCHS[arch]
    if method == "ia3":
        ff = FEEDFORWARD[arch] if arch == "llama" else ["dense"]
        cfg = peft.IA3Config(target_modules=targets, feedforward_modules=ff)
    else:
        cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, use_dora=method == "dora")
    return peft.get_peft_model(build(), cfg)


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _inside(explained: Any, package_dir: str) -> int:
    return sum(any(os.path.abspath(f.filename).startswith(package_dir) for f in br.user_stack)
               for br in explained.break_reasons)


def measure(library: str, arch: str, method: str) -> dict[str, Any]:
    import peft

    import peftkit

    model = (_peftkit if library == "peftkit" else _peft)(arch, method)
    _perturb(model)
    model.train()
    ids = torch.randint(2, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    pkg = os.path.dirname(os.path.abspath((peftkit if library == "peftkit" else peft).__file__))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(input_ids=ids)
    row = {"library": library, "arch": arch, "method": method, "graphs": ex.graph_count,
           "breaks": ex.graph_break_count, "inside": _inside(ex, pkg)}
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
        out.float().pow(2).sum().backward()
        row["fullgraph"] = "yes"
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["fullgraph"] = f"no ({type(e).__name__})"
    torch._dynamo.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every peftkit method that adapts Linear layers too")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    jobs = [(lib, arch, m) for arch in ARCHS for m in ("lora", "dora", "ia3") for lib in ("peftkit", "peft")]
    if args.all:
        import peftkit

        extra = [i.name for i in peftkit.all_methods()
                 if not i.model_level and "linear" in i.hosts and i.name not in ("lora", "dora", "ia3")]
        jobs += [("peftkit", arch, m) for arch in ARCHS for m in extra]
    rows = []
    print(f"{'library':8} {'arch':6} {'method':18} {'graphs':>6} {'breaks':>6} {'inside':>6}  fullgraph")
    for lib, arch, method in jobs:
        try:
            row = measure(lib, arch, method)
        except Exception as e:  # noqa: BLE001 - a method that cannot adapt this model with its defaults
            print(f"{lib:8} {arch:6} {method:18} skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
            continue
        rows.append(row)
        print(f"{lib:8} {arch:6} {method:18} {row['graphs']:>6} {row['breaks']:>6} {row['inside']:>6}  "
              f"{row['fullgraph']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
