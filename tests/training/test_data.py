"""models.training.data: record parsing, templates, response-only labels, truncation,
bad records."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest

from models.training.data import (
    IGNORE,
    DataError,
    Record,
    collate,
    load_dataset,
    load_mixture,
    parse_range,
    read_records,
    split_spec,
    step_batches,
    tokenize,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat_template: bool = True) -> Any:
    """A character-level tokenizer built offline (103 ids: fits the tiny models' 256)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", additional_special_tokens=SPECIALS[4:],
    )  # fmt: skip
    if chat_template:
        tok.chat_template = CHATML
    return tok


def write_alpaca(path: Path, n: int = 6) -> Path:
    recs = [{"instruction": f"say {i}", "input": "" if i % 2 else "ctx", "output": f"ok {i}"}
            for i in range(n)]  # fmt: skip
    path.write_text(json.dumps(recs))
    return path


def text_of(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids))


def test_alpaca_labels_cover_exactly_the_response_with_chat_template() -> None:
    tok = make_tokenizer()
    rec = Record(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}),
                 "x:1", 0)  # fmt: skip
    ex = tokenize(tok, rec, 512)
    assert ex is not None
    full = text_of(tok, list(ex.input_ids))
    assert full == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    labelled = [t for t in ex.labels if t != IGNORE]
    assert text_of(tok, labelled) == "yo<|im_end|>\n"
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ex.prompt_len == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(x == IGNORE for x in ex.labels[: ex.prompt_len])
    assert list(ex.labels[ex.prompt_len :]) == list(ex.input_ids[ex.prompt_len :])


def test_multi_turn_chat_labels_every_assistant_turn_only() -> None:
    tok = make_tokenizer()
    msgs = ({"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"})  # fmt: skip
    ex = tokenize(tok, Record(msgs, "x:1", 0), 512)
    assert ex is not None
    assert text_of(tok, [t for t in ex.labels if t != IGNORE]) == "b<|im_end|>\nd<|im_end|>\n"
    first_b = list(ex.input_ids).index(tok.convert_tokens_to_ids("b"))
    assert ex.labels[first_b - 1] == IGNORE and ex.labels[first_b] != IGNORE


def test_alpaca_template_without_chat_template_ends_with_eos() -> None:
    tok = make_tokenizer(chat_template=False)
    rec = Record(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}),
                 "x:1", 0)  # fmt: skip
    ex = tokenize(tok, rec, 512)
    assert ex is not None
    want = "### Instruction:\nhi\n\n### Response:\nyo</s>"
    assert text_of(tok, list(ex.input_ids)).endswith(want)
    assert text_of(tok, [t for t in ex.labels if t != IGNORE]) == "yo</s>"


def test_truncation_and_records_without_response_in_window(tmp_path: Path) -> None:
    tok = make_tokenizer()
    path = write_alpaca(tmp_path / "a.json")
    ds = load_dataset(path, tok, max_length=40)
    assert all(len(e.input_ids) <= 40 for e in ds.examples)
    with pytest.raises(DataError, match="no usable records"):  # prompts alone exceed 10
        load_dataset(path, tok, max_length=10)
    n_prompt = tokenize(tok, read_records(path)[0][1], 512).prompt_len  # type: ignore[union-attr]
    cut = load_dataset(path, tok, max_length=n_prompt + 2)
    ex = next(e for e in cut.examples if e.index == 1)
    assert len(ex.input_ids) == n_prompt + 2 and ex.num_targets == 2
    ds2 = load_dataset(path, tok, max_length=512, records=parse_range("2:5"))
    assert [e.index for e in ds2.examples] == [2, 3, 4]
    assert len(ds2.sha256) == 64 and ds2.total_records == 6


def test_alpaca_input_is_appended_to_the_instruction(tmp_path: Path) -> None:
    recs, bad, total = read_records(write_alpaca(tmp_path / "a.json", 2))
    assert recs[0].messages[0]["content"] == "say 0\n\nctx"
    assert recs[1].messages[0]["content"] == "say 1"
    assert (bad, total) == ([], 2)


BAD_JSONL = "\n".join([
    json.dumps({"instruction": "a", "output": "b"}),
    "{not json",
    json.dumps({"instruction": "", "output": "b"}),
    "",
    json.dumps({"messages": [{"role": "user", "content": "q"}]}),
    json.dumps({"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "r"}]}),
    json.dumps({"instruction": "a", "output": 3}),
])  # fmt: skip


def test_bad_records_are_skipped_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(BAD_JSONL)
    recs, bad, total = read_records(path, "skip")
    assert [r.where for r in recs] == [f"{path}:line 1", f"{path}:line 6"]
    assert [b.where for b in bad] == [f"{path}:line {n}" for n in (2, 3, 5, 7)]
    assert "not valid JSON" in bad[0].reason
    assert "'instruction'" in bad[1].reason
    assert "assistant" in bad[2].reason
    assert "'output'" in bad[3].reason
    assert total == 6


def test_bad_record_error_mode_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(BAD_JSONL)
    with pytest.raises(DataError, match=r"d\.jsonl:line 2: not valid JSON"):
        read_records(path, "error")


def test_json_array_reports_record_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "b"}, 5]))
    recs, bad, _ = read_records(path)
    assert len(recs) == 1
    assert [b.where for b in bad] == [f"{path}:record 2", f"{path}:record 3"]


def test_unreadable_file_and_bad_range() -> None:
    with pytest.raises(DataError, match="make data"):
        load_dataset(Path("/nonexistent.json"), make_tokenizer())
    with pytest.raises(ValueError, match="START:END"):
        parse_range("5")


def test_collate_pads_right_and_masks_labels(tmp_path: Path) -> None:
    tok = make_tokenizer()
    ds = load_dataset(write_alpaca(tmp_path / "a.json", 2), tok)
    a, b = ds.examples
    batch = collate([a, b], pad_id=0)
    t = max(len(a.input_ids), len(b.input_ids))
    assert batch.input_ids.shape == (2, t) == batch.labels.shape
    for row, ex in enumerate((a, b)):
        n = len(ex.input_ids)
        assert batch.input_ids[row, :n].tolist() == list(ex.input_ids)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (t - n)
        assert batch.labels[row, n:].tolist() == [IGNORE] * (t - n)


def test_step_batches_are_deterministic_and_split_across_ranks(tmp_path: Path) -> None:
    ds = load_dataset(write_alpaca(tmp_path / "a.json", 6), make_tokenizer())
    one = step_batches(ds.examples, 3, micro_batch=2, accum=2, seed=1)
    assert one == step_batches(ds.examples, 3, micro_batch=2, accum=2, seed=1)
    assert [len(mb) for mb in one] == [2, 2]
    r0 = step_batches(ds.examples, 3, micro_batch=1, accum=2, rank=0, world=2, seed=1)
    r1 = step_batches(ds.examples, 3, micro_batch=1, accum=2, rank=1, world=2, seed=1)
    ids = sorted(e.index for mb in r0 + r1 for e in mb)
    assert ids == sorted(e.index for mb in one for e in mb)
    # each epoch (6 examples / 4 per step) visits every example once
    seen = [e.index for s in range(3) for mb in step_batches(ds.examples, s, 2, 1, seed=1)
            for e in mb]  # fmt: skip
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]


def test_sharegpt_text_and_txt_records_with_their_lines(tmp_path: Path) -> None:
    tok = make_tokenizer()
    conv = tmp_path / "c.jsonl"
    rows = [
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "ok"}, {"from": "human", "value": "bye"}]},
        {"conversations": [{"from": "robot", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt",
                                                                       "value": "a"}},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"text": "plain text here"},
        {"text": ""},
    ]  # fmt: skip
    conv.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs, bad, total = read_records(conv)
    assert total == 6
    # a leading gpt turn and trailing human turns are dropped; the chosen answer is a turn
    assert [m["role"] for m in recs[0].messages] == ["user", "assistant"]
    assert recs[1].messages[-1] == {"role": "assistant", "content": "a"}
    assert recs[2].text == "plain text here" and recs[2].messages == ()
    assert [b.where for b in bad] == [f"{conv}:line {n}" for n in (2, 4, 6)]
    assert "'robot'" in bad[0].reason and "gpt" in bad[1].reason and "'text'" in bad[2].reason
    ex = tokenize(tok, recs[2], 64)
    assert ex is not None and ex.labels == ex.input_ids  # every token of text is a target
    assert text_of(tok, list(ex.input_ids)) == "plain text here"
    txt = tmp_path / "w.txt"
    txt.write_text("first paragraph\n\nsecond one\n")
    recs, bad, total = read_records(txt)
    assert [(r.where, r.text) for r in recs] == [(f"{txt}:line 1", "first paragraph"),
                                                 (f"{txt}:line 3", "second one")]  # fmt: skip


def test_mixture_concatenates_files_with_their_own_ranges(tmp_path: Path) -> None:
    tok = make_tokenizer()
    a = write_alpaca(tmp_path / "a.json", 6)
    txt = tmp_path / "w.txt"
    txt.write_text("one\ntwo\nthree\n")
    mix = load_mixture([f"{a}@2:4", txt], tok, 64)
    single = load_dataset(a, tok, 64, records=slice(2, 4))
    assert [e.input_ids for e in mix.examples[:2]] == [e.input_ids for e in single.examples]
    assert len(mix.examples) == 5 and mix.total_records == 9
    assert mix.sha256 != single.sha256
    assert split_spec("x/y.json@:899") == (Path("x/y.json"), slice(None, 899))
    assert split_spec("x/y.json") == (Path("x/y.json"), slice(None))
