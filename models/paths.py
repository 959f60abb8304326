"""Where soft-serve keeps what it builds once and reuses: converted GGUFs, compiled
kernels, teachers' caches. `$SOFT_CACHE_DIR`, default `~/.cache/soft-serve`. The bottom of
the model side: it imports nothing of it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SOFT_CACHE_DIR", Path.home() / ".cache" / "soft-serve"))
