"""Instruction data for `soft-train` and `soft-eval`: records → token ids + response labels.

Record shapes, in a JSON array or JSONL (one object per line):
- Alpaca: `{"instruction": str, "input": str (optional), "output": str, "system": str (opt)}`
- chat:   `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`,
  optionally with `"chosen": {"from": "gpt", "value": str}` (preference data: the chosen
  answer is the assistant turn); turns after the last `gpt` turn are dropped
- text:   `{"text": str}` (plain text, e.g. C4); a `.txt` file holds one text per line

Each chat record becomes messages, rendered with the tokenizer's chat template (or the
Alpaca prompt template when the tokenizer has none). Labels are -100 on everything but the
assistant turns (loss on response tokens only), aligned with `input_ids` the Hugging Face
way (the loss shifts them); a text record is labelled on every token. A malformed record
is reported with its line (JSONL) or record number (JSON array) and skipped or refused
(`on_bad="skip"|"error"`). Several files mix with `load_mixture("a.json@:899", "b.txt")`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
ROLES = ("system", "user", "assistant")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


class DataError(ValueError):
    """Bad data the user must fix; the message names the file and line/record."""


@dataclass(frozen=True)
class Record:
    """One parsed record: chat messages (or plain text) and where it came from."""

    messages: tuple[dict[str, str], ...]
    where: str  # "file:line 12" or "file:record 3"
    index: int  # 0-based position among all records of the file
    text: str | None = None  # a plain-text record (no messages): every token is a target


@dataclass(frozen=True)
class BadRecord:
    where: str
    reason: str
    index: int = -1  # 0-based position among all records of the file

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class Example:
    """A tokenized record. `labels[t]` is the target of position t (IGNORE on prompt)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int  # tokens before the first response token (for generation)
    index: int

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class Dataset:
    """Examples of one file plus what was left out and the file's checksum."""

    examples: list[Example]
    records: list[Record]  # the kept records, same order as examples
    bad: list[BadRecord] = field(default_factory=list)
    too_long: int = 0  # records whose response fell entirely past max_length
    sha256: str = ""
    total_records: int = 0


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T) right-padded
    labels: Tensor  # (B, T) IGNORE on prompt and padding
    attention_mask: Tensor  # (B, T) 1 on real tokens


# -- reading --------------------------------------------------------------------------


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}  # fmt: skip


def _sharegpt_messages(obj: dict[str, Any]) -> tuple[dict[str, str], ...]:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    if "chosen" in obj:
        turns = [*turns, obj["chosen"]]
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise ValueError(f"conversations[{i}] must be an object with a string 'value'")
        role = SHAREGPT_ROLES.get(t.get("from"))  # type: ignore[arg-type]
        if role is None:
            raise ValueError(f"conversations[{i}].from is {t.get('from')!r}; expected one of "
                             f"{sorted(SHAREGPT_ROLES)}")  # fmt: skip
        out.append({"role": role, "content": t["value"]})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    while out and out[0]["role"] == "assistant":  # a conversation the human did not start
        out.pop(0)
    if not out or not out[-1]["content"].strip():
        raise ValueError("no non-empty 'gpt' turn to learn from")
    return tuple(out)


def _record_text(obj: Any) -> str | None:
    """The text of a plain-text record, None for a chat record."""
    if isinstance(obj, dict) and "text" in obj and "messages" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        return str(obj["text"])
    return None


def _record_messages(obj: Any) -> tuple[dict[str, str], ...]:
    """Validate one decoded object; raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        return _sharegpt_messages(obj)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] is not an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role is {role!r}; expected one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
            raise ValueError("the last message must be a non-empty 'assistant' turn")
        return tuple(out)
    instruction, inp, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("'instruction' must be a non-empty string (or give 'messages')")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise ValueError("'input' must be a string")
    if not isinstance(output, str) or not output.strip():
        raise ValueError("'output' must be a non-empty string")
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        msgs.insert(0, {"role": "system", "content": system})
    return tuple(msgs)


def read_records(path: Path, on_bad: str = "skip") -> tuple[list[Record], list[BadRecord], int]:
    """Parse a JSON array, a JSONL file, or a `.txt` file (one text record per line).

    Returns:
        (records, bad records, total number of records seen including bad ones).
    Raises:
        DataError on the first bad record when on_bad == "error", or when the file is
        neither valid JSON nor JSONL.
    """
    assert on_bad in ("skip", "error"), on_bad
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    items: list[tuple[str, Any, str | None]] = []  # (where, object, parse error)
    stripped = text.lstrip()
    if path.suffix == ".txt":
        items = [(f"{path}:line {n}", {"text": line}, None)
                 for n, line in enumerate(text.splitlines(), start=1) if line.strip()]  # fmt: skip
    elif stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
        items = [(f"{path}:record {i + 1}", obj, None) for i, obj in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:line {n}", json.loads(line), None))
            except json.JSONDecodeError as e:
                items.append((f"{path}:line {n}", None, f"not valid JSON ({e.msg})"))
    records: list[Record] = []
    bad: list[BadRecord] = []
    for index, (where, obj, err) in enumerate(items):
        try:
            if err is not None:
                raise ValueError(err)
            plain = _record_text(obj)
            msgs = () if plain is not None else _record_messages(obj)
            records.append(Record(msgs, where, index, plain))
        except ValueError as e:
            if on_bad == "error":
                raise DataError(f"{where}: {e} (use --on-bad-record skip to skip it)") from e
            bad.append(BadRecord(where, str(e), index))
    return records, bad, len(items)


def parse_range(spec: str | None) -> slice:
    """'START:END' (Python slice of record positions, either side optional) → slice."""
    if not spec:
        return slice(None)
    parts = spec.split(":")
    if len(parts) != 2:
        raise ValueError(f"records range must look like START:END (e.g. :899), got {spec!r}")
    try:
        lo, hi = (int(p) if p.strip() else None for p in parts)
    except ValueError as e:
        raise ValueError(f"records range must hold integers, got {spec!r}") from e
    return slice(lo, hi)


# -- formatting -----------------------------------------------------------------------


def _alpaca_text(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The Alpaca prompt template, used when the tokenizer has no chat template."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(m["content"].strip() + "\n\n")
        elif m["role"] == "user":
            out.append(f"### Instruction:\n{m['content']}\n\n### Response:\n")
        else:
            out.append(m["content"] + "\n\n")
    text = "".join(out)
    if not any(m["role"] == "system" for m in messages):
        text = ALPACA_HEADER + text
    return text


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
    text = _alpaca_text(messages, add_generation_prompt)
    if messages and messages[-1]["role"] == "assistant" and tokenizer.eos_token:
        text = text.rstrip("\n") + tokenizer.eos_token  # teach the model to stop
    return text


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize(tokenizer: Any, record: Record, max_length: int) -> Example | None:
    """Render and tokenize one record; None if no response token fits in max_length.

    Each assistant turn i is labelled over the tokens that rendering messages[:i+1] adds
    to rendering messages[:i] with the generation prompt (its content + end of turn).
    """
    if record.text is not None:
        ids = _ids(tokenizer, record.text)[:max_length]
        return Example(tuple(ids), tuple(ids), 0, record.index) if len(ids) > 1 else None
    msgs = record.messages
    ids = _ids(tokenizer, render(tokenizer, msgs, False))
    labels = [IGNORE] * len(ids)
    first = len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, render(tokenizer, msgs[:i], True))) if i else 0
        end = len(_ids(tokenizer, render(tokenizer, msgs[: i + 1], False)))
        end = min(end, len(ids))
        labels[start:end] = ids[start:end]
        first = min(first, start)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return Example(tuple(ids), tuple(labels), first, record.index)


def load_dataset(
    path: Path,
    tokenizer: Any,
    max_length: int = 512,
    on_bad: str = "skip",
    records: slice = slice(None),
) -> Dataset:
    """Read, validate, select (`records`, by position in the file) and tokenize a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (try `make data`)")
    parsed, bad, total = read_records(path, on_bad)
    lo, hi, _ = records.indices(total)
    bad = [b for b in bad if lo <= b.index < hi]  # only the selected records count
    for b in bad:
        log.warning("skipping bad record %s", b)
    parsed = [r for r in parsed if lo <= r.index < hi]
    examples, kept = [], []
    too_long = 0
    for r in parsed:
        ex = tokenize(tokenizer, r, max_length)
        if ex is None:
            too_long += 1
            continue
        examples.append(ex)
        kept.append(r)
    if too_long:
        log.warning("%d records had no response token within max_length=%d", too_long, max_length)
    if not examples:
        raise DataError(f"{path}: no usable records in range {lo}:{hi}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Dataset(examples, kept, bad, too_long, digest, total)


def split_spec(spec: str | Path) -> tuple[Path, slice]:
    """'PATH' or 'PATH@START:END' (a slice of that file's records) → (path, slice)."""
    text = str(spec)
    path, _, rng = text.rpartition("@") if "@" in text else (text, "", "")
    return Path(path), parse_range(rng or None)


def load_mixture(
    specs: Sequence[str | Path],
    tokenizer: Any,
    max_length: int = 512,
    on_bad: str = "skip",
    records: slice = slice(None),
) -> Dataset:
    """`load_dataset` over several files ('PATH' or 'PATH@START:END' each; `records`
    applies to files without their own range), concatenated in order. The checksum
    covers every file and its range."""
    parts = []
    for spec in specs:
        path, rng = split_spec(spec)
        parts.append(load_dataset(path, tokenizer, max_length, on_bad,
                                  rng if "@" in str(spec) else records))  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    digest = hashlib.sha256(
        "\n".join(f"{s} {p.sha256}" for s, p in zip(specs, parts, strict=True)).encode()
    ).hexdigest()
    return Dataset(
        examples=[e for p in parts for e in p.examples],
        records=[r for p in parts for r in p.records],
        bad=[b for p in parts for b in p.bad],
        too_long=sum(p.too_long for p in parts),
        sha256=digest,
        total_records=sum(p.total_records for p in parts),
    )


# -- batching -------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, labels, mask)


def step_batches(
    examples: Sequence[Example],
    step: int,
    micro_batch: int,
    accum: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
) -> list[list[Example]]:
    """The micro-batches this rank runs at optimizer step `step` (0-based).

    Deterministic in (seed, step): the data order is a fresh permutation per epoch over
    an endless stream, so `--resume` at step s sees exactly what an unbroken run would.
    The step's global batch is sorted by length before splitting, to cut padding.
    """
    n = len(examples)
    per_step = micro_batch * accum * world
    start = step * per_step
    chosen: list[Example] = []
    for pos in range(start, start + per_step):
        epoch, i = divmod(pos, n)
        chosen.append(examples[int(_epoch_order(n, seed, epoch)[i])])
    chosen.sort(key=lambda e: len(e.input_ids))
    mine = chosen[rank::world]
    return [mine[j * micro_batch : (j + 1) * micro_batch] for j in range(accum)]


_ORDER_CACHE: dict[tuple[int, int, int], Tensor] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 4:
            _ORDER_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _ORDER_CACHE[key] = torch.randperm(n, generator=g)
    return _ORDER_CACHE[key]


def iter_eval_batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """Fixed-order batches, similar lengths together (eval needs no shuffling)."""
    order = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
