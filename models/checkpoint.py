"""The SoFT checkpoint format: a Hugging Face model directory plus `soft.json`.

```json
{"format": "soft-checkpoint/1", "method": "soft", "exits": [10, 15, 20, 25, 30],
 "base_model": "…", "training": {…}, "latency_profile": {…}}
```

A directory may also be a *delta* checkpoint: `soft.json` + `soft_delta.safetensors` and no
full weights. Its `base_model` names what the delta applies to (a directory, a `.gguf`, or
a built-in name); LoRA runs save this form to keep checkpoints small.

Every error names the file and the field, so a user knows what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "soft-checkpoint/1"
METHODS = ("soft", "sft", "early-exit", "balcony", "base")
SOFT_JSON = "soft.json"
EXIT_HEADS = "exit_heads.safetensors"
EXIT_LAYERS = "exit_layers.safetensors"  # balcony: one decoder layer per exit below L
DELTA = "soft_delta.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class SoftConfig:
    """The contents of `soft.json`."""

    method: str
    exits: tuple[int, ...]
    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    latency_profile: dict[str, Any] | None = None
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format,
            "method": self.method,
            "exits": list(self.exits),
            "base_model": self.base_model,
            "training": self.training,
        }
        if self.latency_profile is not None:
            data["latency_profile"] = self.latency_profile
        return data

    def with_profile(self, profile: dict[str, Any]) -> SoftConfig:
        return replace(self, latency_profile=profile)


def base_config(num_layers: int) -> SoftConfig:
    """What a directory without `soft.json` is served as: every depth allowed."""
    return SoftConfig(method="base", exits=tuple(range(1, num_layers + 1)))


def parse_soft_json(data: Any, path: Path, num_layers: int | None) -> SoftConfig:
    """Validate a decoded `soft.json`. `num_layers=None` skips the range check of exits."""

    def bad(fld: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field '{fld}' {why}")

    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise bad("format", f"is {fmt!r}; this version of soft-serve reads {FORMAT!r}")
    method = data.get("method")
    if method not in METHODS:
        raise bad("method", f"is {method!r}; expected one of {', '.join(METHODS)}")
    exits = data.get("exits")
    if not isinstance(exits, list) or not exits:
        raise bad("exits", "must be a non-empty list of layer counts, e.g. [10, 20, 30]")
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in exits):
        raise bad("exits", f"must hold integers only, got {exits!r}")
    if len(set(exits)) != len(exits):
        raise bad("exits", f"has duplicates: {exits!r}")
    if exits != sorted(exits):
        raise bad("exits", f"must be sorted ascending, got {exits!r}")
    if num_layers is not None and (exits[0] < 1 or exits[-1] > num_layers):
        raise bad("exits", f"must lie in 1..{num_layers} (the model's layers), got {exits!r}")
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise bad("training", "must be an object")
    profile = data.get("latency_profile")
    if profile is not None and not isinstance(profile, dict):
        raise bad("latency_profile", "must be an object")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise bad("base_model", "must be a string")
    return SoftConfig(
        method=method,
        exits=tuple(exits),
        base_model=base,
        training=training,
        latency_profile=profile,
    )


def read_soft_json(directory: Path, num_layers: int | None) -> SoftConfig | None:
    """Read and validate `directory/soft.json`; None when the file does not exist."""
    path = Path(directory) / SOFT_JSON
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    return parse_soft_json(data, path, num_layers)


def write_soft_json(directory: Path, cfg: SoftConfig) -> Path:
    path = Path(directory) / SOFT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves a half-written soft.json
    return path


def weight_files(directory: Path) -> list[Path]:
    """The model's own safetensors shards (not exit heads, not a delta)."""
    return sorted(
        p
        for p in Path(directory).glob("*.safetensors")
        if p.name not in (EXIT_HEADS, EXIT_LAYERS, DELTA)
    )


def check_weight_files(directory: Path, cfg: SoftConfig) -> None:
    directory = Path(directory)
    if not weight_files(directory):
        if pickles := sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt")):
            raise CheckpointError(
                f"{directory}: only pickle weights ({pickles[0].name}); soft-serve reads "
                "safetensors only. Convert with `model.save_pretrained(dir)` in transformers."
            )
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    if cfg.method == "early-exit" and not (directory / EXIT_HEADS).exists():
        raise CheckpointError(
            f"{directory / SOFT_JSON}: field 'method' is 'early-exit' but {EXIT_HEADS} is missing"
        )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (never pickle)."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            out[key] = f.get_tensor(key)
    return out


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_delta(
    path: Path,
    full: dict[str, torch.Tensor],
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> None:
    """Write a delta: `full` tensors replace the base's; `lora[name] = (A, B)` adds
    `scale * B @ A` to the base's `name`."""
    tensors: dict[str, torch.Tensor] = {k: v.contiguous() for k, v in full.items()}
    for name, (a, b) in lora.items():
        tensors[f"{name}.lora_A"] = a.contiguous()
        tensors[f"{name}.lora_B"] = b.contiguous()
    save_file(tensors, str(path), metadata={"lora_scale": repr(float(scale))})


def apply_delta(state: dict[str, torch.Tensor], path: Path) -> None:
    """Merge a `soft_delta.safetensors` into a Hugging Face state dict, in place."""
    delta = read_tensors(path)
    scale = float(read_metadata(path).get("lora_scale", "1.0"))
    for key, value in delta.items():
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            b = delta.get(f"{name}.lora_B")
            if b is None or name not in state:
                raise CheckpointError(f"{path}: '{key}' has no matching lora_B or base weight")
            w = state[name]
            upd = (b.float() @ value.float()) * scale  # (out, r) @ (r, in)
            state[name] = (w.float() + upd).to(w.dtype)
        elif key.endswith(".lora_B"):
            continue
        else:
            if key not in state:
                raise CheckpointError(f"{path}: '{key}' is not a weight of the base model")
            state[key] = value.to(state[key].dtype)
