"""schemathesis against a live server on a tiny random model: every operation of
/openapi.json, a few hundred generated requests each, every check (status codes and
bodies the document declares, content types, headers, no 5xx). Slow: `make test-slow`.
SOFT_FUZZ_EXAMPLES sets the cases per operation (default 300)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fakes import PROFILE, make_served_checkpoint
from tests.test_server_e2e import start_server, stop_server

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).with_name("schemathesis.toml")


def schemathesis() -> str | None:
    """$SCHEMATHESIS (.ci/run installs it in a Python 3.12 venv of its own: on 3.11 its
    hypothesis crashes) or a schemathesis on PATH."""
    return os.environ.get("SCHEMATHESIS") or shutil.which("schemathesis")


@pytest.mark.skipif(schemathesis() is None, reason="schemathesis not installed: set "
                    "SCHEMATHESIS to its executable (see .ci/run)")  # fmt: skip
def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    exe = schemathesis()
    assert exe is not None
    ckpt = make_served_checkpoint(tmp_path / "tiny", profile=PROFILE)
    server = start_server(ckpt, tmp_path / "server.log", "--max-queue", "64")
    examples = os.environ.get("SOFT_FUZZ_EXAMPLES", "300")
    try:
        out = subprocess.run(
            [
                exe,
                "--no-color",
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                examples,
                "--workers",
                "2",
                "--suppress-health-check",
                "all",
                "--request-timeout",
                "30",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=3000,
            cwd=tmp_path,  # its cache (.schemathesis/) stays out of the tree
        )
    finally:
        clean = stop_server(server)
    log = server.log.read_text()
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert clean and "Traceback" not in log, log[-4000:]
