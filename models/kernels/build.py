"""Compiling cpu.cpp into the shared library models/kernels/__init__.py loads.

Two builds: this machine's (`-march=native`), compiled on first use and cached under
`$SOFT_CACHE_DIR/kernels/` by source, compiler, flags and CPU; and a portable one for any
x86-64 CPU with AVX2 + FMA (all cpu.cpp's intrinsics need), compiled once and shipped
beside cpu.cpp where no compiler will be (the Docker image's wheel):

    python models/kernels/build.py        # writes models/kernels/soft_cpu-<source hash>.so

Standard library only, so that the image's build stage runs it by path before any of the
project's dependencies is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu.cpp")
COMMON = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
NATIVE = ("-march=native",)  # this CPU's whole instruction set
PORTABLE = ("-mavx2", "-mfma", "-mf16c")  # what cpu.cpp's intrinsics need, nothing more
TIMEOUT_S = 300


def compiler() -> str | None:
    """The C++ compiler: `$CXX`, else g++ or c++ on PATH; None without one."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def shipped() -> Path:
    """Where the portable build of this cpu.cpp lies when one was shipped: its name
    carries the source's hash, so a build of another version of cpu.cpp is never loaded."""
    return SOURCE.with_name(f"soft_cpu-{source_hash()}.so")


def compile_to(out: Path, cxx: str, flags: Sequence[str]) -> Path:
    """cpu.cpp compiled with `flags` into `out` (atomically: a concurrent build leaves
    one whole file). Raises RuntimeError with the compiler's message when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        cmd = [cxx, *COMMON, *flags, str(SOURCE), "-o", str(part)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(part, out)
    return out


def native(cache: Path, cxx: str, cpu_flags: frozenset[str]) -> Path:
    """This machine's build under `cache` (compiled if missing)."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join([cxx, *COMMON, *NATIVE, *sorted(cpu_flags)]).encode()
    ).hexdigest()[:16]
    out = cache / key / "soft_cpu.so"
    return out if out.exists() else compile_to(out, cxx, NATIVE)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print("usage: python models/kernels/build.py  (writes the portable build beside "
              "cpu.cpp)", file=sys.stderr)  # fmt: skip
        return 2
    cxx = compiler()
    if cxx is None:
        print("no C++ compiler (g++ or $CXX) on PATH", file=sys.stderr)
        return 1
    print(compile_to(shipped(), cxx, PORTABLE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
