"""`soft-profile`: measures a tiny checkpoint through the engine, stores a profile the
server reads back, prints the table, writes a PNG; clear errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.checkpoint import read_soft_json
from server.policy.latency import LatencyProfile, read_profile_file
from server.profile import Measurements, fit, in_depth, line_fit, main, spread

QUICK = ["--prompt-lens", "8,32", "--batch-sizes", "1,4", "--repeats", "1", "--tokens", "5"]


def test_fit_helpers_are_exact() -> None:
    assert line_fit({0: 2.0, 10: 7.0, 20: 12.0}) == pytest.approx((2.0, 0.5))
    assert line_fit({1: 3.0}) == (3.0, 0.0)
    assert line_fit({0: 5.0, 10: 1.0}) == pytest.approx((3.0, 0.0))  # never a negative slope
    assert spread(list(range(1, 31))) == [1, 8, 15, 23, 30]
    assert spread([2, 4]) == [2, 4]


def test_fit_smooths_each_cost_along_depth() -> None:
    assert in_depth({8: 2.0, 16: 3.0}) == {8: 2.0, 16: 3.0}  # two depths: as measured
    assert in_depth({8: 2.0, 16: 3.0, 24: 4.0}) == pytest.approx({8: 2.0, 16: 3.0, 24: 4.0})
    # per row: 1 + d/16 ms, but depth 8 read high (2.5 instead of 1.5)
    steps = {d: {1: 10.0 + d, 9: 10.0 + d + 8 * (1 + d / 16)} for d in (8, 16, 24, 32)}
    steps[8][9] = 18.0 + 8 * 2.5
    prefill = {d: {8: 1.0 + 0.1 * d * 8, 32: 1.0 + 0.1 * d * 32} for d in (8, 16, 24, 32)}
    p = fit(Measurements(prefill, steps, []), (8, 16, 24, 32))
    rows = [p.decode_ms_per_row[d] for d in (8, 16, 24, 32)]
    assert rows == sorted(rows) and len(set(rows)) == 4  # still rises with depth: no plateau
    assert rows[-1] - rows[0] == pytest.approx(24 * 0.025)  # least-squares slope of the four
    assert p.step_ms(24) == pytest.approx(34.0) and p.prefill_ms(16, 10) == pytest.approx(17.0)


def test_profile_into_soft_json_and_into_a_file(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tiny_dir), *QUICK, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| depth | prefill base ms" in out and "| mix 2x2,4x2 |" in out
    soft = read_soft_json(tiny_dir, 4)
    assert soft is not None and soft.method == "soft" and soft.exits == (2, 4)  # kept
    raw = soft.latency_profile or {}
    assert set(raw["decode_ms_per_row"]) == {"2", "4"} and raw["measured"]["depths"] == [2, 4]
    prof = LatencyProfile.from_json(raw, (2, 4))
    assert 0 < prof.step_ms(2) <= prof.step_ms(4) and prof.prefill_ms(4, 32) > 0
    assert (tiny_dir / "latency_profile.png").read_bytes()[:4] == b"\x89PNG"

    target = tmp_path / "p.json"
    assert main([str(tiny_dir), *QUICK, "--quiet", "--depths", "4", "--out", str(target)]) == 0
    assert "--latency-profile" in capsys.readouterr().out
    assert set(json.loads(target.read_text())["measured"]["step_ms"]) == {"4"}
    filled = read_profile_file(str(target), (2, 4))  # depth 2 filled from depth 4 alone:
    assert filled.step_ms(4) > 0  # a line through the origin, half of depth 4's cost
    assert filled.step_ms(2) == pytest.approx(filled.step_ms(4) / 2, rel=1e-3)  # 4 decimals
    assert (tmp_path / "p.png").exists()


def test_errors_exit_2(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    (tiny_dir / "soft.json").unlink()  # a plain HF directory: say where to write instead
    assert main([str(tiny_dir)]) == 2
    assert "--out FILE" in capsys.readouterr().err
    assert main([str(tiny_dir), "--out", str(tmp_path / "no" / "dir" / "p.json")]) == 2
    assert main([str(tiny_dir), "--tokens", "2", "--out", str(tmp_path / "p.json")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--batch-sizes", "0,x"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="--latency-profile"):
        read_profile_file(str(tmp_path / "missing.json"), (2, 4))
