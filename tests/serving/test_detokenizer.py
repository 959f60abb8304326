"""server/serving/detokenizer.py: incremental detokenization and stop strings, on a byte-level BPE
tokenizer that splits multi-byte characters across tokens."""

from __future__ import annotations

from typing import Any

import pytest

from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.serving.detokenizer import Detokenizer, Track
from tests.fakes import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def run(tok: Any, text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], Track]:
    ids = tok(text)["input_ids"]
    req = GenerationRequest("r", (1,), SamplingParams(max_tokens=len(ids)), depth=2)
    track = Track(req, 0, 0, Detokenizer(tok, [1]), stops)
    pieces = []
    for k, tid in enumerate(ids):
        last = k == len(ids) - 1
        track.on_event(TokenEvent("r", tid, finish_reason="length" if last else None), 0.0)
        pieces.append(track.releasable())
        if track.done:
            break
    return pieces, track


@pytest.mark.parametrize("text", ["Zürich 東京 🙂!", "plain ascii text", "🙂🙂🙂"])
def test_pieces_are_whole_characters(tok: Any, text: str) -> None:
    pieces, track = run(tok, text)
    assert "".join(pieces) == text == track.text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    "text, stops, expect",
    [
        ("Hello world, hello moon", ("world",), "Hello "),
        ("Hello world", ("xyz",), "Hello world"),
        ("a.b.c", (".", "b"), "a"),
        ("Zürich 東京", ("京",), "Zürich 東"),
        ("one\n\ntwo", ("\n\n",), "one"),
        ("abcabc", ("cab",), "ab"),
    ],
)
def test_stop_strings(tok: Any, text: str, stops: tuple[str, ...], expect: str) -> None:
    pieces, track = run(tok, text, stops)
    assert track.text == expect and "".join(pieces) == expect
    assert track.finish_reason == ("stop" if expect != text else "length")


def test_stop_prefix_is_held_back_until_decided(tok: Any) -> None:
    pieces, track = run(tok, "see the end", ("the end!",))
    # nothing that could begin "the end!" leaves before the sequence ends
    assert "".join(pieces) == "see the end" and track.finish_reason == "length"
    released_before_end = "".join(pieces[:-1])
    assert not released_before_end.endswith("the")
