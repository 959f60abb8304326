"""Fixtures of the training tests: a tiny base model with a tokenizer, and a data file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_hf_model
from tests.training.test_data import make_tokenizer, write_alpaca


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A 4-layer random LLaMA with a character-level tokenizer, as a base for training."""
    out = tmp_path / "base"
    make_hf_model(seed=3).save_pretrained(str(out), safe_serialization=True)
    make_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_alpaca(tmp_path / "data.json", 12)
