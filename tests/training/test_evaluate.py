"""soft-eval: per-depth CE against a naive reference, generations, outputs, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models.generate import greedy_generate
from models.training.data import IGNORE, collate, load_dataset
from models.training.evaluate import (
    CheckpointResult,
    DepthResult,
    main,
    markdown_table,
    response_ce,
    rouge_l,
)
from tests.conftest import make_hf_model
from tests.training.test_data import make_tokenizer, write_alpaca


@pytest.fixture
def tiny_tok_dir(tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    make_hf_model(seed=5).save_pretrained(str(out), safe_serialization=True)
    make_tokenizer().save_pretrained(str(out))
    (out / "soft.json").write_text(json.dumps(
        {"format": "soft-checkpoint/1", "method": "soft", "exits": [2, 4]}))  # fmt: skip
    return out


def test_response_ce_matches_per_depth_logits(tiny_tok_dir: Path, tmp_path: Path) -> None:
    m = models.load(tiny_tok_dir)
    ds = load_dataset(write_alpaca(tmp_path / "d.json", 5), m.tokenizer)
    got = response_ce(m, ds, [1, 2, 4], batch_size=2)
    for d in (1, 2, 4):
        total, n = 0.0, 0
        for ex in ds.examples:  # one at a time, no padding: the naive reference
            b = collate([ex], 0)
            logits = m.logits(b.input_ids, d)[0, :-1]
            tgt = b.labels[0, 1:]
            total += float(F.cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="sum"))
            n += int((tgt != IGNORE).sum())
        assert math.isclose(got[d], total / n, rel_tol=1e-5)


def test_rouge_l_exact_values() -> None:
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("", "") == 1.0
    assert math.isclose(rouge_l("the cat", "the cat sat on"), 2 * (1.0 * 0.5) / 1.5)


def test_markdown_table_rows() -> None:
    r = CheckpointResult(
        "A",
        "a",
        "soft",
        (2, 4),
        4,
        [DepthResult(2, 1.5, 4.48, 0.25, 0.5, 100.0), DepthResult(4, 1.0, 2.72, None, None, None)],
    )
    table = markdown_table([r]).splitlines()
    assert table[2] == "| A | soft | 2 | 1.500 | 4.5 | 0.250 | 0.500 | – | 100.0 | – |"
    assert table[3] == "| A | soft | 4 | 1.000 | 2.7 | – | – | – | – | – |"


def test_soft_eval_without_out_writes_a_new_run_directory(
    tiny_tok_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --out: results go to runs/eval/soft-eval-<date>-<time>.*, not the working dir."""
    data = write_alpaca(tmp_path / "d.json", 4)
    monkeypatch.chdir(tmp_path)
    main([str(tiny_tok_dir), "--data", str(data), "--gen-samples", "1", "--max-new-tokens",
          "2", "--no-speed-b16", "--no-progress"])  # fmt: skip
    written = sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir())
    assert len(written) == 3 and {Path(n).suffix for n in written} == {".json", ".md", ".png"}
    assert all(n.startswith("soft-eval-") for n in written)
    assert not list(tmp_path.glob("soft-eval.*"))


def test_soft_eval_writes_json_markdown_and_plot(tiny_tok_dir: Path, tmp_path: Path) -> None:
    data = write_alpaca(tmp_path / "d.json", 6)
    out = tmp_path / "res" / "eval"
    main(
        [
            f"{tiny_tok_dir}=tiny",
            str(tiny_tok_dir),
            "--data",
            str(data),
            f"{data}@:3",
            "--records",
            "2:",
            "--gen-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    payload = json.loads(out.with_suffix(".json").read_text())
    first = payload["results"][0]
    assert first["label"] == "tiny" and first["exits"] == [2, 4]
    assert [d["depth"] for d in first["depths"]] == [2, 4]
    full = first["depths"][-1]
    assert full["agreement"] == 1.0  # full depth agrees with itself
    assert full["token_agreement"] == 1.0
    assert 0.0 <= first["depths"][0]["token_agreement"] <= 1.0
    assert all(d["tokens_per_s_b16"] > 0 for d in first["depths"])
    # CE on each data set; the first is the primary (records 2: of it)
    assert list(full["ce_by_data"]) == [str(data), f"{data}@:3"]
    assert full["ce_by_data"][str(data)] == full["ce"]
    m0 = models.load(tiny_tok_dir)
    want_ce = response_ce(m0, load_dataset(data, m0.tokenizer, records=slice(0, 3)), [4], 8)
    assert math.isclose(full["ce_by_data"][f"{data}@:3"], want_ce[4], rel_tol=1e-3)
    assert all(d["tokens_per_s"] > 0 for d in first["depths"])
    assert payload["results"][1]["label"] == str(tiny_tok_dir)
    assert out.with_suffix(".md").read_text().count("\n") == 2 + 4
    assert out.with_suffix(".png").stat().st_size > 1000
    # the sample is the greedy decode of the first held-out prompt at that depth
    m = models.load(tiny_tok_dir)
    ex = load_dataset(data, m.tokenizer).examples[2]
    ids = greedy_generate(m, torch.tensor(ex.input_ids[: ex.prompt_len]), 2, 4, (2, 0))
    want = m.tokenizer.decode([i for i in ids if i not in (0, 2)], skip_special_tokens=True)
    assert first["depths"][0]["sample"] == want


@pytest.mark.parametrize("bad", [["--depths", "x"], ["--records", "1"], ["--gen-samples", "-1"],
                                 ["--data", "/nonexistent.json"]])  # fmt: skip
def test_bad_cli_input_exits_2(bad: list[str], tiny_tok_dir: Path, tmp_path: Path,
                               capsys) -> None:  # fmt: skip
    data = write_alpaca(tmp_path / "d.json", 3)
    with pytest.raises(SystemExit) as e:
        main([str(tiny_tok_dir), "--data", str(data), *bad])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    data = write_alpaca(tmp_path / "d.json", 3)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope"), "--data", str(data)])
    assert e.value.code == 2 and "no such model" in capsys.readouterr().err


def test_benchmark_merge_combines_soft_eval_results(tiny_tok_dir: Path, tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "run.py"
    spec = importlib.util.spec_from_file_location("quality_run", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = write_alpaca(tmp_path / "d.json", 4)
    for label in ("a", "b"):
        args = ["--gen-samples", "1", "--max-new-tokens", "2", "--no-progress"]
        main(
            [f"{tiny_tok_dir}={label}", "--data", str(data), "--out", str(tmp_path / label), *args]
        )
    out = tmp_path / "merged"
    bench.merge([tmp_path / "a.json", tmp_path / "b.json"], out)
    merged = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in merged["results"]] == ["a", "b"]
    assert out.with_suffix(".md").read_text().count("| a |") == 2
    assert out.with_suffix(".png").exists()


def test_soft_eval_int8_ce_within_two_percent(tiny_tok_dir: Path, tmp_path: Path) -> None:
    data = write_alpaca(tmp_path / "d.json", 6)
    ce = {}
    for mode in ("none", "int8"):
        out = tmp_path / mode
        main([str(tiny_tok_dir), "--data", str(data), "--gen-samples", "0", "--no-speed-b16",
              "--quantization", mode, "--out", str(out), "--no-progress"])  # fmt: skip
        payload = json.loads(out.with_suffix(".json").read_text())
        assert payload["config"]["quantization"] == mode
        ce[mode] = [d["ce"] for d in payload["results"][0]["depths"]]
    for a, b in zip(ce["none"], ce["int8"], strict=True):
        assert a != b and abs(b - a) / a < 0.02  # quantized (not the same numbers), close
