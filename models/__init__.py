"""The model side of soft-serve: SoFT checkpoints, loaders and the dynamic-depth runner.

```python
import models
m = models.load("default")            # or a checkpoint dir / .gguf path; device=, dtype=
m.num_layers, m.exits, m.tokenizer    # L, trained exits, a transformers tokenizer
m.logits(input_ids, depth)            # [B,T] -> [B,T,V], full forward at `depth`, no cache
```
"""

from models.checkpoint import CheckpointError, SoftConfig, read_soft_json, write_soft_json
from models.llama import KVStore, ModelConfig, SortedModel, UnsupportedModel
from models.loader import load

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
