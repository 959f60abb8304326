"""Resumable training state: `OUT/resume/` holds the trainable weights (safetensors), the
optimizer, the scheduler, the step, the RNG, the per-step losses and the commands so far;
and what every trainer returns (`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import read_soft_json

RESUME_DIR = "resume"


@dataclass(frozen=True)
class TrainResult:
    """What a `soft-train` run leaves: where, how many steps, which exits, and the loss of
    each exit over its last steps."""

    out: Path
    steps: int
    exits: tuple[int, ...]
    final_losses: dict[int, float]  # mean loss per exit over the last steps


def final_loss(history: list[dict[str, float]], exit: int, last: int = 20) -> float:
    """Mean loss of `exit` over the last `last` steps that trained it (nan when none did)."""
    seen = [h[str(exit)] for h in history if str(exit) in h][-last:]
    return sum(seen) / len(seen) if seen else math.nan


def save_resume(out: Path, wrapper: nn.Module, opt: Any, sched: Any, step: int,
                history: list[dict[str, float]], commands: list[str]) -> None:  # fmt: skip
    from safetensors.torch import save_file

    tmp = out / (RESUME_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    params = {n: p.detach().contiguous() for n, p in wrapper.named_parameters() if p.requires_grad}
    save_file(params, str(tmp / "trainable.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "history": history, "rng": rng, "commands": commands},
               tmp / "state.pt")  # fmt: skip
    final = out / RESUME_DIR
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.replace(final)


def load_resume(
    out: Path, wrapper: nn.Module, opt: Any, sched: Any
) -> tuple[int, list[dict[str, float]], list[str]]:
    """Restore OUT/resume into `wrapper`, `opt` and `sched`; (step, history, commands).

    The exits may change on resume (e.g. a shallower exit added to a finished run) when
    nothing trainable belongs to one exit (soft, sft); early-exit heads must match.
    Raises ValueError with what to change when the saved state does not fit.
    """
    from safetensors.torch import load_file

    d = out / RESUME_DIR
    params = load_file(str(d / "trainable.safetensors"))
    own = dict(wrapper.named_parameters())
    if missing := sorted(set(params) - set(own)):
        raise ValueError(f"{d}: saved weights {missing[:3]} have no place in this run "
                         "(early-exit heads: resume with the same --exits)")  # fmt: skip
    with torch.no_grad():
        for n, v in params.items():
            own[n].copy_(v)
    state = torch.load(d / "state.pt", weights_only=True)  # never unpickles code
    history = [history_row(h, state, out) for h in state["history"]]
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    # --steps may differ from the saved run's: the LR of the next step follows the new schedule
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * fn(sched.last_epoch)
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"]), history, list(state.get("commands", []))


def history_row(row: Any, state: dict[str, Any], out: Path) -> dict[str, float]:
    """One step's per-exit CE as {exit: ce}; states written before rows were keyed by
    exit hold plain lists, ordered as the exits in OUT/soft.json."""
    if isinstance(row, dict):
        return {str(k): float(v) for k, v in row.items()}
    soft = read_soft_json(out, None)
    exits = list(soft.exits) if soft else []
    if len(exits) != len(row):
        raise ValueError(f"{out / RESUME_DIR}: an old resume state whose exits are unknown "
                         f"({len(row)} losses per step, soft.json lists {exits}); "
                         "resume it once with its original --exits")  # fmt: skip
    return {str(e): float(x) for e, x in zip(exits, row, strict=True)}


def start(args: Any, parser: Any, module: nn.Module) -> tuple[Any, Any, int, list[dict[str, float]],
                                                            list[str]]:  # fmt: skip
    """AdamW over `module`'s trainable parameters, a cosine schedule with warmup (default
    5 % of --steps), and, with --resume and a saved state under --out, that state.

    Returns:
        (optimizer, scheduler, step, per-step losses {exit: value}, the commands so far
        ending with this one). A saved state that does not fit exits with a message (2).
    """
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    sched = get_cosine_schedule_with_warmup(opt, warmup, args.steps)
    step, commands = 0, [args.command]
    history: list[dict[str, float]] = []  # per step: {exit: loss}
    if args.resume and (Path(args.out) / RESUME_DIR / "state.pt").exists():
        try:
            step, history, previous = load_resume(Path(args.out), module, opt, sched)
        except ValueError as e:
            parser.error(str(e))
        commands = previous + commands
    return opt, sched, step, history, commands
