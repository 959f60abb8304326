"""The sorted loss: every exit of one forward pass trained as its own language model.

Sub-model d = decoder layers [0, d) → the model's final RMSNorm → the shared LM head
(SoFT, Kavehzadeh et al. 2023). One forward pass per batch; forward hooks on
`layers[d-1]` capture each exit's residual stream (transformers' `output_hidden_states`
normalises its last entry, so it cannot serve as an exit). Each exit's norm + head +
cross-entropy runs on the response positions only, inside `torch.utils.checkpoint`: its
(N, V) logits are freed right after its loss and recomputed in backward, so the exits'
logits are never all alive at once — the head dominates a small model's activations.

Optional self-distillation (`distill` = W > 0): each exit's loss becomes
(1 − W)·CE + W·KL(teacher ‖ exit), the teacher being the frozen base model's full-depth
distribution (`FrozenTeacher`), on the response positions or on every token.

`SortedLoss` is an `nn.Module` so that DDP / FSDP (through accelerate) wrap it whole:
the training step is just `out = sorted_loss(batch); accelerator.backward(out.loss)`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.training.data import IGNORE


@dataclass(frozen=True)
class ExitLoss:
    """One batch's sorted loss.

    loss: differentiable scalar, sum_d w_d * CE_sum_d / normaliser (weights sum to 1);
        with distillation sum_d w_d * ((1-W) CE_sum_d / normaliser + W KL_sum_d / kl_normaliser)
    per_exit: (E,) detached summed CE per exit (divide by `tokens` for the mean)
    tokens: number of response targets in the batch
    per_exit_kl: (E,) detached summed KL(teacher ‖ exit) per exit, when distilling
    kl_tokens: number of positions the KL was summed over
    """

    loss: Tensor
    per_exit: Tensor
    tokens: int
    per_exit_kl: Tensor | None = None
    kl_tokens: int = 0


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


def _exit_ce_kl(h: Tensor, norm: nn.Module, head: nn.Module, targets: Tensor,
                teacher_logp: Tensor) -> Tensor:  # fmt: skip
    """(2,): summed CE over the positions with a target, summed KL(teacher ‖ exit) over all."""
    logp = F.log_softmax(head(norm(h)).float(), dim=-1)  # (N, V)
    ce = F.nll_loss(logp, targets, ignore_index=IGNORE, reduction="sum")
    kl = F.kl_div(logp, teacher_logp, log_target=True, reduction="sum")
    return torch.stack([ce, kl])


class FrozenTeacher:
    """The untrained model's full-depth logits, the self-distillation target.

    With LoRA the teacher is the same weights with the adapter disabled (and the final
    norm as it was before training, since that norm trains too); otherwise a frozen copy
    taken now. Build it before `SortedLoss` registers its hooks and before `--resume`
    loads trained weights.
    """

    def __init__(self, causal_lm: nn.Module, peft_model: Any = None) -> None:
        self._peft = peft_model
        if peft_model is None:
            self._model = copy.deepcopy(causal_lm).requires_grad_(False).eval()
        else:
            self._model = causal_lm
            backbone: Any = causal_lm.model
            self._norm = backbone.norm.weight.detach().clone()

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T, V) logits."""
        if self._peft is None:
            if next(self._model.parameters()).device != input_ids.device:
                self._model.to(input_ids.device)  # the copy was taken before accelerate moved
            return self._model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).logits  # fmt: skip
        norm: Any = self._model.model.norm  # type: ignore[union-attr]
        trained = norm.weight.data
        norm.weight.data = self._norm.to(trained.device)
        try:
            with self._peft.disable_adapter():
                return self._model(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits  # fmt: skip
        finally:
            norm.weight.data = trained


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
        distill: W in [0, 1], the weight of KL(teacher ‖ exit) against CE (0: CE only).
        teacher: (input_ids, attention_mask) -> (B, T, V) logits, needed when distill > 0.
        distill_all_tokens: the KL covers every token (prompt too), not only the response.
    """

    def __init__(
        self,
        causal_lm: nn.Module,
        exits: Sequence[int],
        weights: Sequence[float] | None = None,
        exit_heads: nn.ModuleDict | None = None,
        frozen_backbone: bool = False,
        distill: float = 0.0,
        teacher: Callable[[Tensor, Tensor | None], Tensor] | None = None,
        distill_all_tokens: bool = False,
    ) -> None:
        super().__init__()
        assert 0.0 <= distill <= 1.0, f"distill weight must be in [0, 1], got {distill}"
        assert distill == 0.0 or teacher is not None, "distillation needs a teacher"
        self.distill = float(distill)
        self.teacher = teacher
        self.distill_all_tokens = distill_all_tokens
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

    def kl_positions(self, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T-1) bool: the positions the distillation KL is summed over."""
        if not self.distill_all_tokens:
            return labels[:, 1:] != IGNORE
        if attention_mask is None:
            return torch.ones_like(labels[:, 1:], dtype=torch.bool)
        return attention_mask[:, 1:].bool()  # every position whose next token is real

    def forward(
        self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
        normaliser: float | None = None, kl_normaliser: float | None = None,
    ) -> ExitLoss:  # fmt: skip
        """input_ids, labels, attention_mask: (B, T); labels IGNORE where no loss.
        `normaliser` divides the summed CE (default: this batch's target count; pass the
        whole accumulated step's count so micro-batches of any length weigh fairly);
        `kl_normaliser` likewise divides the summed KL (default: this batch's KL positions)."""
        targets = labels[:, 1:]  # position t predicts token t+1
        select = targets != IGNORE  # (B, T-1)
        tokens = int(select.sum())
        distilling = self.distill > 0.0
        if distilling:
            select = self.kl_positions(labels, attention_mask) | select
        self._captured = {}
        backbone: Any = self.causal_lm.model
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let attention take its causal fast path
        teacher_logp = None
        if distilling:
            assert self.teacher is not None
            t_logits = self.teacher(input_ids, attention_mask)[:, :-1][select]
            teacher_logp = F.log_softmax(t_logits.float(), dim=-1)  # (N, V)
            del t_logits
            self._captured = {}  # the teacher's pass went through the hooks too
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            # the decoder alone: no full-sequence logits; the hooks keep what we need
            backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        captured, self._captured = self._captured, {}
        flat_targets = targets[select]  # (N,)
        kl_tokens = int(select.sum()) if distilling else 0
        sums = []
        for d in self.exits:
            h = captured[d][:, :-1][select]  # (N, H) loss positions only
            norm, head = self.head_for(d)
            fn: Any = _exit_ce_kl if distilling else _exit_ce
            extra = (teacher_logp,) if distilling else ()
            if torch.is_grad_enabled():
                sums.append(checkpoint(fn, h, norm, head, flat_targets, *extra,
                                       use_reentrant=False))  # fmt: skip
            else:
                sums.append(fn(h, norm, head, flat_targets, *extra))
        stacked = torch.stack(sums)  # (E,) summed CE, or (E, 2) summed CE and KL
        denom = float(normaliser if normaliser is not None else max(tokens, 1))
        weights = cast(Tensor, self.weights).to(stacked.device)
        if not distilling:
            loss = (stacked * weights).sum() / denom
            return ExitLoss(loss, stacked.detach(), tokens)
        kl_denom = float(kl_normaliser if kl_normaliser is not None else max(kl_tokens, 1))
        per_exit, per_exit_kl = stacked[:, 0], stacked[:, 1]
        mixed = (1.0 - self.distill) * per_exit / denom + self.distill * per_exit_kl / kl_denom
        loss = (mixed * weights).sum()
        return ExitLoss(loss, per_exit.detach(), tokens, per_exit_kl.detach(), kl_tokens)


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
