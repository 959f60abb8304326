"""The model side of soft-serve: SoFT checkpoints, loaders and the dynamic-depth runner.

```python
import models
m = models.load("default")            # or a checkpoint dir / .gguf path; device=, dtype=
m.num_layers, m.exits, m.tokenizer    # L, trained exits, a transformers tokenizer
m.logits(input_ids, depth)            # [B,T] -> [B,T,V], full forward at `depth`, no cache
```

The names below are imported on first use, so that a module that needs no model (the
command lines' settings, `models.quantization`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.checkpoint import CheckpointError, SoftConfig, read_soft_json, write_soft_json
    from models.llama import KVStore, ModelConfig, SortedModel, UnsupportedModel
    from models.loader import load

# public name -> the module that defines it
_PUBLIC = {
    "CheckpointError": "checkpoint",
    "SoftConfig": "checkpoint",
    "read_soft_json": "checkpoint",
    "write_soft_json": "checkpoint",
    "KVStore": "llama",
    "ModelConfig": "llama",
    "SortedModel": "llama",
    "UnsupportedModel": "llama",
    "load": "loader",
}

__all__ = [
    "CheckpointError",
    "KVStore",
    "ModelConfig",
    "SoftConfig",
    "SortedModel",
    "UnsupportedModel",
    "load",
    "read_soft_json",
    "write_soft_json",
]


def __getattr__(name: str) -> Any:
    """`models.load` and the other public names; `models.llama` and the other modules."""
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"models.{_PUBLIC[name]}"), name)
    try:
        return importlib.import_module(f"models.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"models.{name}":
            raise
        raise AttributeError(f"module 'models' has no attribute {name!r}") from None
