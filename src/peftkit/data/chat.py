"""Chat data for causal-LM instruction tuning: the English ChatterBot corpus, JSONL files, a held-out split that
never shares a question with training, and chat-template tokenisation with labels on the answers only.

A conversation is a list of ``{"role", "content"}`` messages (roles ``system``, ``user``, ``assistant``). Sources:

* the English part of the ``chatterbot-corpus`` package (its YAML files, found without importing the package):
  every conversation of two or more turns, turns alternating user / assistant. The corpus repeats itself (2,026
  conversations, 899 distinct: the tech-support file is 1,050 copies of 10), so exact duplicates are dropped;
* a ``.jsonl`` file whose lines are ``{"prompt": ..., "response": ...}`` or ``{"messages": [...]}``.

:func:`tokenize_chat` renders the conversation with the tokenizer's own chat template
(``tokenizer.apply_chat_template``), piece by piece: everything up to and including each assistant header
(``add_generation_prompt=True``) gets label -100, the assistant's answer up to and including its end-of-turn token
gets its own ids as labels. The prompt pieces are tokenised exactly as :func:`prompt_ids` tokenises a prompt at
generation time, so training and generation see the same tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from .text import json_objects, open_text

CHATTERBOT = "chatterbot"
CHATTERBOT_PACKAGE = "chatterbot-corpus"
IGNORE = -100  # label of tokens that carry no loss
ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class ChatData:
    """``conversations[i]`` is a list of messages; ``source`` names where they came from."""

    conversations: list[list[Message]]
    source: str
    duplicates: int = 0  # exact duplicate conversations dropped while loading

    def __len__(self) -> int:
        return len(self.conversations)

    def prompt(self, i: int) -> str:
        """The first user message of conversation ``i`` (what a held-out example asks)."""
        return next(m["content"] for m in self.conversations[i] if m["role"] == "user")


# -- sources --------------------------------------------------------------------------------------------------
def chatterbot_dir() -> Path:
    """The English YAML folder of the ``chatterbot-corpus`` package (found without importing it)."""
    from ..models.packages import package_folder

    path = package_folder("chatterbot_corpus", CHATTERBOT_PACKAGE, "the chat data", "pass --data FILE.jsonl") \
        / "data" / "english"
    if not any(path.glob("*.yml")):
        raise PeftkitError(f"the installed {CHATTERBOT_PACKAGE!r} package has no data/english/*.yml; reinstall it")
    return path


def _dedupe(conversations: list[list[Message]]) -> tuple[list[list[Message]], int]:
    seen: set[str] = set()
    out = []
    for c in conversations:
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out, len(conversations) - len(out)


def load_chatterbot() -> ChatData:
    """Every English conversation of two or more turns (files in name order), turns alternating user/assistant;
    exact duplicates dropped (the first copy stays)."""
    try:
        import yaml
    except ImportError:
        raise PeftkitError("reading the ChatterBot corpus needs PyYAML: pip install pyyaml") from None
    convs: list[list[Message]] = []
    for path in sorted(chatterbot_dir().glob("*.yml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise PeftkitError(f"{path}: not a readable ChatterBot YAML file ({type(e).__name__})") from None
        for turns in doc.get("conversations") or []:
            if not isinstance(turns, list) or len(turns) < 2:
                continue
            texts = [str(t).strip() for t in turns]
            if all(texts):
                convs.append([{"role": ROLES[1 + i % 2], "content": t} for i, t in enumerate(texts)])
    if not convs:
        raise PeftkitError(f"the {CHATTERBOT_PACKAGE!r} package holds no English conversations")
    unique, dropped = _dedupe(convs)
    return ChatData(unique, CHATTERBOT, dropped)


def _messages(path: Path, n: int, raw: Any) -> list[Message]:
    where = f"{path}:{n}"
    if not isinstance(raw, list) or not raw:
        raise PeftkitError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out: list[Message] = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PeftkitError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PeftkitError(f"{where}: messages[{j}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    first = next((j for j, m in enumerate(out) if m["role"] != "system"), None)
    if first is None or out[first]["role"] != "user":
        raise PeftkitError(f"{where}: the first non-system message must have role 'user'")
    if not any(m["role"] == "assistant" for m in out):
        raise PeftkitError(f"{where}: no 'assistant' message, so nothing to learn")
    return out


def load_chat_jsonl(path: str | Path) -> ChatData:
    """A ``.jsonl`` file: each non-blank line ``{"prompt": str, "response": str}`` or ``{"messages": [...]}``.
    Every problem is reported with its line number; duplicates are kept (a repeated line is a weighting)."""
    path = Path(path)
    convs: list[list[Message]] = []
    with open_text(path) as f:
        for n, rec in json_objects(f, path):
            has_pair, has_chat = "prompt" in rec or "response" in rec, "messages" in rec
            if has_pair and has_chat:
                raise PeftkitError(f"{path}:{n}: has both 'messages' and 'prompt'/'response'; give one form")
            if has_chat:
                convs.append(_messages(path, n, rec["messages"]))
            elif "prompt" in rec and "response" in rec:
                p, r = rec["prompt"], rec["response"]
                if not isinstance(p, str) or not isinstance(r, str):
                    raise PeftkitError(f"{path}:{n}: 'prompt' and 'response' must be strings")
                convs.append([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
            else:
                raise PeftkitError(f"{path}:{n}: expected {{'prompt', 'response'}} or {{'messages': [...]}}, "
                                   f"found keys {sorted(rec)}")
    if not convs:
        raise PeftkitError(f"{path}: no examples")
    return ChatData(convs, str(path.resolve()))


def load_chat_data(source: str | None) -> ChatData:
    """``None`` or ``"chatterbot"``: the English ChatterBot corpus; a ``.jsonl`` / ``.ndjson`` path otherwise."""
    if source is None or source == CHATTERBOT:
        return load_chatterbot()
    suffix = Path(source).suffix.lower()
    if suffix not in (".jsonl", ".ndjson"):
        raise PeftkitError(f"{source}: chat data must be a .jsonl file of {{'prompt', 'response'}} or "
                           f"{{'messages'}} lines, got {suffix or 'no suffix'!r}")
    return load_chat_jsonl(source)


def split_by_prompt(data: ChatData, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices. Conversations are grouped by their first user message and whole groups are drawn
    (Python's ``random`` with ``seed``) until the held-out side has at least ``eval_size`` conversations, so no
    held-out question is ever trained on. Both lists are in data order."""
    n = len(data)
    if not 1 <= eval_size < n:
        raise PeftkitError(f"eval size must be between 1 and {n - 1} for {n} conversations, got {eval_size}")
    groups: dict[str, list[int]] = {}
    for i in range(n):
        groups.setdefault(" ".join(data.prompt(i).lower().split()), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held: list[int] = []
    for k in keys:
        if len(held) >= eval_size:
            break
        held += groups[k]
    if len(held) >= n:
        raise PeftkitError(f"eval size {eval_size} leaves no training conversation: the held-out side takes whole "
                           f"questions and the data has only {len(groups)} distinct ones")
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], sorted(held)


# -- tokenisation ---------------------------------------------------------------------------------------------
def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PeftkitError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template; causal-LM training "
                           "needs an instruction-tuned model whose tokenizer defines one")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_ids(tokenizer: Any, messages: str | Sequence[Message]) -> list[int]:
    """Token ids of the prompt that asks the model to answer: a question string is one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return _ids(tokenizer, _render(tokenizer, messages, True))


def tokenize_chat(tokenizer: Any, messages: Sequence[Message], max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation, truncated to ``max_length`` tokens. ``labels[t]`` is
    ``input_ids[t]`` on every assistant answer (its end-of-turn token included) and -100 everywhere else (system
    and user turns, chat-template markup, the assistant headers, whitespace after an end-of-turn)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k == 0:
            continue
        prompt = _render(tokenizer, messages[:k], True)
        full = _render(tokenizer, messages[: k + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise PeftkitError("the chat template does not render a conversation as a prefix of its continuation; "
                               "answer-only labels cannot be placed")
        context, answer = _ids(tokenizer, prompt[len(done):]), _ids(tokenizer, full[len(prompt):])
        cut = len(answer)
        if eos is not None and eos in answer:
            cut = len(answer) - answer[::-1].index(eos)
        ids += context + answer
        labels += [IGNORE] * len(context) + answer[:cut] + [IGNORE] * (len(answer) - cut)
        done = full
    return ids[:max_length], labels[:max_length]


def encode_chats(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], max_length: int
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Tokenise every conversation; returns ``(ids, labels, kept)`` where ``kept`` are the indices of the
    conversations that still have an answer token after truncation (the others are dropped)."""
    if max_length < 2:
        raise PeftkitError(f"max length must be at least 2 tokens, got {max_length}")
    all_ids, all_labels, kept = [], [], []
    for i, conv in enumerate(conversations):
        ids, labels = tokenize_chat(tokenizer, conv, max_length)
        if any(x != IGNORE for x in labels):
            all_ids.append(ids)
            all_labels.append(labels)
            kept.append(i)
    return all_ids, all_labels, kept
