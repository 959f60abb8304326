"""The sorted loss: every exit of one forward pass trained as its own language model.

Sub-model d = decoder layers [0, d) → the model's final RMSNorm → the shared LM head
(SoFT, Kavehzadeh et al. 2023). One forward pass per batch; forward hooks on
`layers[d-1]` capture each exit's residual stream (transformers' `output_hidden_states`
normalises its last entry, so it cannot serve as an exit). Each exit's norm + head +
cross-entropy runs on the response positions only, inside `torch.utils.checkpoint`: its
(N, V) logits are freed right after its loss and recomputed in backward, so the exits'
logits are never all alive at once — the head dominates a small model's activations.

`SortedLoss` is an `nn.Module` so that DDP / FSDP (through accelerate) wrap it whole:
the training step is just `out = sorted_loss(batch); accelerator.backward(out.loss)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.data import IGNORE


@dataclass(frozen=True)
class ExitLoss:
    """One batch's sorted loss.

    loss: differentiable scalar, sum_d w_d * CE_sum_d / normaliser (weights sum to 1)
    per_exit: (E,) detached summed CE per exit (divide by `tokens` for the mean)
    tokens: number of response targets in the batch
    """

    loss: Tensor
    per_exit: Tensor
    tokens: int


def default_exits(num_layers: int, count: int = 8, start: float = 0.3) -> tuple[int, ...]:
    """~`count` exits evenly spread from `start` of the depth to full depth (the paper
    uses 12, 16, …, 40 of 40 layers)."""
    lo = max(1, round(start * num_layers))
    if num_layers - lo + 1 <= count:
        return tuple(range(lo, num_layers + 1))
    step = (num_layers - lo) / (count - 1)
    return tuple(sorted({round(lo + i * step) for i in range(count)}))


def _exit_ce(h: Tensor, norm: nn.Module, head: nn.Module, targets: Tensor) -> Tensor:
    logits = head(norm(h))  # (N, V): the only place this exit's logits exist
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class SortedLoss(nn.Module):
    """Wraps a `*ForCausalLM` (plain or with peft LoRA layers injected) and computes the
    weighted sorted loss over `exits` from one forward pass.

    Args:
        causal_lm: a LLaMA-family `*ForCausalLM`; `.model.layers`, `.model.norm`,
            `.lm_head` are used.
        exits: depths (1..L) to train, ascending.
        weights: one per exit; normalised to sum 1 (default: uniform, the paper).
        exit_heads: optional per-exit (norm, head) modules (the early-exit baseline);
            exits without one use the model's own norm and head.
        frozen_backbone: run the decoder without autograd (early-exit baseline).
    """

    def __init__(
        self,
        causal_lm: nn.Module,
        exits: Sequence[int],
        weights: Sequence[float] | None = None,
        exit_heads: nn.ModuleDict | None = None,
        frozen_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        layers: Any = causal_lm.model.layers  # type: ignore[union-attr]
        exits = tuple(int(d) for d in exits)
        assert exits and list(exits) == sorted(set(exits)), f"exits must be ascending: {exits}"
        assert 1 <= exits[0] and exits[-1] <= len(layers), f"exits outside 1..{len(layers)}"
        w = torch.tensor([1.0] * len(exits) if weights is None else list(weights))
        assert w.numel() == len(exits) and bool((w >= 0).all()) and float(w.sum()) > 0, (
            "need one non-negative weight per exit"
        )
        self.exits = exits
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.exit_heads = exit_heads if exit_heads is not None else nn.ModuleDict()
        self.frozen_backbone = frozen_backbone
        self._captured: dict[int, Tensor] = {}
        for d in exits:
            layers[d - 1].register_forward_hook(self._hook(d))

    def _hook(self, depth: int):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> None:
            h = output[0] if isinstance(output, tuple) else output
            self._captured.setdefault(depth, h)  # first call; gradient-checkpoint reruns skip

        return hook

    def head_for(self, depth: int) -> tuple[nn.Module, nn.Module]:
        key = str(depth)
        if key in self.exit_heads:
            eh = self.exit_heads[key]
            return eh.norm, eh.lm_head  # type: ignore[union-attr, return-value]
        backbone = self.causal_lm.model  # type: ignore[union-attr]
        return backbone.norm, self.causal_lm.lm_head  # type: ignore[return-value]

    def forward(
        self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
        normaliser: float | None = None,
    ) -> ExitLoss:  # fmt: skip
        """input_ids, labels, attention_mask: (B, T); labels IGNORE where no loss.
        `normaliser` divides the summed CE (default: this batch's target count; pass the
        whole accumulated step's count so micro-batches of any length weigh fairly)."""
        targets = labels[:, 1:]  # position t predicts token t+1
        select = targets != IGNORE  # (B, T-1)
        tokens = int(select.sum())
        self._captured = {}
        backbone: Any = self.causal_lm.model
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let attention take its causal fast path
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            # the decoder alone: no full-sequence logits; the hooks keep what we need
            backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        captured, self._captured = self._captured, {}
        flat_targets = targets[select]  # (N,)
        sums = []
        for d in self.exits:
            h = captured[d][:, :-1][select]  # (N, H) response positions only
            norm, head = self.head_for(d)
            if torch.is_grad_enabled():
                ce = checkpoint(_exit_ce, h, norm, head, flat_targets, use_reentrant=False)
            else:
                ce = _exit_ce(h, norm, head, flat_targets)
            sums.append(ce)
        per_exit = torch.stack(sums)  # (E,) summed CE
        denom = float(normaliser if normaliser is not None else max(tokens, 1))
        weights = cast(Tensor, self.weights).to(per_exit.device)
        loss = (per_exit * weights).sum() / denom
        return ExitLoss(loss, per_exit.detach(), tokens)


class ExitHeadModule(nn.Module):
    """The early-exit baseline's own norm + head for one exit, initialised from the
    model's final norm and LM head."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        import copy

        self.norm = copy.deepcopy(norm)
        self.lm_head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(lm_head.weight)
        for p in self.parameters():
            p.requires_grad_(True)
