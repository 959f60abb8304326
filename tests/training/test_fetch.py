"""make data: the ShareGPT recovery from a cut-off JSON array, and checksum refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.training import fetch


def test_recover_sharegpt_keeps_complete_records_before_the_cut() -> None:
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "no answer"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a, [with] {braces}"}]},
    ]  # fmt: skip
    text = json.dumps(records, indent=2)
    cut = text[: text.index('"id": "c"') + 40]  # mid-record, as the package ships it
    lines = fetch.recover_sharegpt(cut.encode()).decode().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a"]  # b has no gpt turn, c is cut
    whole = fetch.recover_sharegpt(text.encode()).decode().splitlines()
    assert [json.loads(x)["id"] for x in whole] == ["a", "c"]
    assert json.loads(whole[1])["conversations"][1]["value"] == "a, [with] {braces}"


def test_a_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:  # fmt: skip
    monkeypatch.setitem(fetch.SHA256, "wiki_demo.txt", "0" * 64)
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.write_checked(tmp_path, "wiki_demo.txt", b"not the file")
    assert not (tmp_path / "wiki_demo.txt").exists()
