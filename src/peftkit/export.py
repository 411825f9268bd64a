"""``peftkit export``: an adapter folder made ready for serving engines.

* ``export_adapter(adapter, output)`` writes the Hugging Face PEFT folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) that vLLM, TGI and LoRAX load as a LoRA adapter and that
  ``peft.PeftModel.from_pretrained`` / ``AutoPeftModelFor…`` read — whatever format the adapter was saved in
  (an older peftkit-format folder included). A method Hugging Face PEFT does not have cannot be written that way:
  the error says so and points to ``merged=True``.
* ``export_adapter(adapter, output, merged=True)`` writes a plain ``transformers`` model folder: the base weights
  with the adapter merged in (``peftkit.merge_and_unload``), the model's config and its tokenizer — loaded by
  ``AutoModelFor….from_pretrained`` with no missing or unexpected keys and the adapted model's outputs, for every
  mergeable method, PEFT's or not. A method that cannot merge is refused by name.

The base model is the folder given, else the one the adapter's ``train_info.json`` names (``peftkit train``), else
the adapter config's ``base_model_name_or_path`` when it is a local folder. It is loaded with the auto class of the
adapter's ``task_type`` (the class the adapter was trained on; a classification head sized from the run's labels),
else the class its ``config.json`` names. Every folder is written as one unit (:func:`peftkit.core.io.write_unit`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .core import io, registry
from .core.errors import PeftkitError
from .core.hf import TASK_HEADS
from .core.model import get_config, load, merge_and_unload, save

#: PEFT task type -> the transformers auto class that loads a model for it (the ``AutoPeftModelFor…`` one's)
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "CAUSAL_LM": "AutoModelForCausalLM", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "FEATURE_EXTRACTION": "AutoModel"}


def _run_info(files: io.AdapterFiles) -> dict[str, Any]:
    raw = files.files.get(io.RUN_INFO_NAME)
    return io.parse_json(raw, f"{files.source}/{io.RUN_INFO_NAME}") if raw is not None else {}


def base_model_dir(adapter: Path, meta: dict[str, Any], info: dict[str, Any], model: str | os.PathLike | None) -> Path:
    """The base model folder of ``adapter`` (see the module docstring)."""
    from .models import default_model_dir, resolve_model_dir

    if model is not None:
        return resolve_model_dir(model)
    if isinstance(info.get("model"), str):
        path = Path(info["model"])
        if not (path / "config.json").is_file() and info.get("model_is_default"):
            return default_model_dir()
        return resolve_model_dir(path)
    named = meta.get("base_model_name_or_path")
    if isinstance(named, str) and (Path(named) / "config.json").is_file():
        return resolve_model_dir(named)
    raise PeftkitError(f"{adapter}: cannot tell which base model the adapter belongs to (no train_info.json, and its "
                       f"base_model_name_or_path {named!r} is not a local model folder); pass --model DIR")


def load_base(model_dir: Path, task_type: str | None, info: dict[str, Any]) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from ``model_dir`` as the adapter's task loads it, in float32 eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from .models import load_errors, load_message, quiet_transformers

    config = io.read_json(model_dir / "config.json")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if task_type in AUTO_CLASSES:
        cls = getattr(transformers, AUTO_CLASSES[task_type])
    else:
        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        cls = cls or transformers.AutoModel
    labels = info.get("label_names")
    if task_type in TASK_HEADS and isinstance(labels, list) and labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                      label2id={str(n): i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
    try:
        with quiet_transformers():
            model = cls.from_pretrained(str(model_dir), **kwargs)
    except load_errors() as e:
        raise PeftkitError(load_message("the base model", model_dir, e)) from None
    tokenizer = None
    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (*load_errors(), ImportError, TypeError):  # a model folder without a tokenizer: nothing to copy
        tokenizer = None
    return model.float().eval(), tokenizer


def export_adapter(
    adapter: str | os.PathLike, output: str | os.PathLike, *, model: str | os.PathLike | None = None,
    merged: bool = False, overwrite: bool = False,
) -> str:
    """Export the adapter in folder ``adapter`` to ``output`` (module docstring); returns what was written, in words."""
    adapter, output = Path(adapter), Path(output)
    files = io.read_adapter_files(adapter)
    meta, info = files.config, _run_info(files)
    if Path(os.path.abspath(output)) == Path(os.path.abspath(adapter)):
        raise PeftkitError(f"--output {output} is the adapter folder itself; export to another folder")
    model_dir = base_model_dir(adapter, meta, info, model)
    task_type = meta.get("task_type") if isinstance(meta.get("task_type"), str) else None
    base, tokenizer = load_base(model_dir, task_type, info)
    name = load(base, adapter)
    method = get_config(base, name).method
    info_m = registry.get(method)
    has_hf, mergeable = info_m.hf_peft_type is not None, info_m.mergeable
    if not merged:
        if not has_hf:
            raise PeftkitError(
                f"method {method!r} has no Hugging Face PEFT counterpart, so no engine reads it as an adapter; "
                + ("export it merged (--merged): the base model with the adapter folded in" if mergeable else
                   "it cannot be merged either: serve it with peftkit (peftkit.load)"))
        save(base, output, name, format="hf", overwrite=overwrite)
        return f"Hugging Face PEFT adapter ({method}) for {model_dir}"
    if not mergeable:
        raise PeftkitError(
            f"method {method!r} cannot be merged into the base weights (no weight change reproduces it); "
            + ("export it as a Hugging Face PEFT adapter folder (without --merged)" if has_hf else
               "it has no Hugging Face PEFT counterpart either: serve it with peftkit (peftkit.load)"))
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise PeftkitError(f"{output} already exists and is not empty; pass --overwrite to replace it")
    from .models import quiet_transformers

    merge_and_unload(base, [name])
    with tempfile.TemporaryDirectory(prefix=".peftkit-export-") as tmp:
        with quiet_transformers():
            base.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        written = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    written["peftkit_export.json"] = (json.dumps({"adapter": str(adapter.absolute()), "method": method,
                                                  "base_model": str(model_dir)}, indent=2) + "\n").encode()
    try:
        io.write_unit(output, written)
    except OSError as e:
        raise PeftkitError(f"cannot write {output}: {e.strerror or e}") from None
    note = (f"; the adapter was trained on a {info['quantize']}-quantised base and is merged into its float weights"
            if info.get("quantize") else "")
    return f"merged {type(base).__name__} ({method} folded into {model_dir}{note})"
