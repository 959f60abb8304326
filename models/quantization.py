"""The weights' format, by name: `--quantization`, `SOFT_QUANTIZATION`,
`models.load(..., quantization=)`. Parsed once into `Quantization`; the formats themselves
and the products over them live in models/weights.py. No torch at import: the command
lines' settings read this module."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Quantization(str, Enum):
    """How a model's layer matrices and head are stored and multiplied."""

    AUTO = "auto"  # int8 where soft-serve's CPU kernels run, else none (`resolve`)
    INT8 = "int8"  # per output row
    INT4 = "int4"  # per group of 32 (GGUF's Q4_1)
    BF16 = "bf16"  # fp32 activations, soft-serve's kernels only
    NONE = "none"  # the checkpoint's float weights as they are

    def __str__(self) -> str:  # its name, as the flag takes it, in messages and f-strings
        return self.value

    @classmethod
    def parse(cls, value: str | Quantization | None) -> Quantization:
        """A mode from its name; None means NONE. Raises ValueError for another name."""
        if value is None:
            return cls.NONE
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"quantization must be one of {names}; got {value!r}") from None

    def resolve(self, device: torch.device) -> Quantization:
        """The mode the weights on `device` get. AUTO: int8 on a CPU where soft-serve's
        kernels load (the fastest setting there, at a held-out CE within 0.2 % of fp32:
        docs/performance.md), the float weights elsewhere (CUDA; a CPU without them).

        Raises:
            ValueError: a quantized mode off the CPU (its products are CPU code).
        """
        from models import kernels  # torch, and the kernels' build: only for a model

        if self is Quantization.AUTO:
            on_kernels = device.type == "cpu" and kernels.available()
            return Quantization.INT8 if on_kernels else Quantization.NONE
        if self is not Quantization.NONE and device.type != "cpu":
            raise ValueError(f"quantization={self} runs on the CPU only (soft-serve's kernels, "
                             f"or torch's int8 / int4 ones); use device='cpu'")  # fmt: skip
        return self
