"""`soft-train`: Sorted Fine-Tuning (SoFT) and its baselines on a LLaMA-family model.

    soft-train --model smollm2-135m-instruct --data data/alpaca_en_demo.json \
        --records :899 --method soft --lora-rank 16 --save-delta --out runs/soft-lora

Methods: `soft` (every exit of one forward pass, loss = weighted mean over exits),
`sft` (last layer only), `early-exit` (the paper's baseline: backbone frozen, one trained
norm + head per exit, saved as `exit_heads.safetensors`), `balcony` (base frozen, one new
decoder layer per exit distilled from the full model on a teacher cache, saved as
`exit_layers.safetensors`; full depth stays the base, bit for bit). Full fine-tuning, or peft LoRA
(`--lora-rank`) on all attention and MLP projections with the final norm trainable too.
Many processes: `torchrun` / `accelerate launch` (DDP or FSDP), see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from models import loader
from models.checkpoint import (
    DELTA,
    EXIT_HEADS,
    SoftConfig,
    apply_delta,
    read_soft_json,
    save_delta,
    write_soft_json,
)
from models.training import resume
from models.training.data import DataError, collate, load_mixture, parse_range, step_batches
from models.training.resume import RESUME_DIR, TrainResult, final_loss, save_resume
from models.training.sorted_loss import ExitHeadModule, FrozenTeacher, SortedLoss, default_exits

log = logging.getLogger("soft-train")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_balcony_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of --method balcony (exit layers on a frozen base, docs/training.md)."""
    g = p.add_argument_group("exit layers (--method balcony)")
    g.add_argument(
        "--teacher-k",
        type=int,
        default=32,
        help="the teacher's top-k token ids cached per token (computed exactly by\n"
        "the sampled head)",
    )
    g.add_argument(
        "--exit-init",
        choices=("last", "next"),
        default="last",
        help="each exit layer starts as a copy of the base's last layer, or of\n"
        "the layer that follows the exit (layer e)",
    )
    g.add_argument(
        "--cache-exits",
        default=None,
        help="comma-separated depths whose residual streams the teacher cache keeps\n"
        "(default: the trained exits). An exit between them starts from the deepest\n"
        "cached depth below it through the frozen base layers in between, so an\n"
        "existing cache serves a new exit (e.g. --exits 15,20,25,27 --cache-exits 15,20,25)",
    )
    g.add_argument(
        "--head",
        choices=("sampled", "full"),
        default="sampled",
        help="the KL's vocabulary: `sampled` computes the --head-exact most frequent\n"
        "tokens and every token's teacher top-k exactly and estimates the rest from\n"
        "--head-samples uniform draws per chunk (unbiased sums); `full` every token",
    )
    g.add_argument("--head-exact", type=int, default=512,
                   help="most frequent tokens always computed exactly")  # fmt: skip
    g.add_argument("--head-samples", type=int, default=512,
                   help="tail tokens drawn per chunk for the estimate")  # fmt: skip
    g.add_argument(
        "--init-from",
        default=None,
        help="start the exit layers from this balcony checkpoint (e.g.\n"
        "models/default) and continue its CE-vs-CPU-hours curve",
    )
    g.add_argument(
        "--eval-data",
        nargs="+",
        default=None,
        help="held-out data (PATH[@START:END] ...): response CE per exit every\n"
        "--eval-every CPU-minutes, written to OUT/curve.json and OUT/curve.png",
    )
    g.add_argument("--eval-every", type=float, default=10.0,
                   help="CPU-minutes (all threads) between held-out CEs")  # fmt: skip
    g.add_argument("--eval-max-length", type=int, default=256,
                   help="truncate held-out sequences (tokens)")  # fmt: skip
    g.add_argument(
        "--cache-dir",
        default=None,
        help="where teacher caches live (default $SOFT_CACHE_DIR/teacher)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soft-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="base: a built-in name, HF dir, SoFT/delta checkpoint or .gguf",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="data files (Alpaca/chat/ShareGPT JSON or JSONL, {'text'} JSONL, .txt), each\n"
        "optionally PATH@START:END (a slice of its records); several are mixed in order",
    )
    p.add_argument(
        "--records",
        default=None,
        help="START:END slice of the file's records to train on (e.g. :899)",
    )
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--method", choices=("soft", "sft", "early-exit", "balcony"), default="soft")
    p.add_argument(
        "--exits",
        default=None,
        help="comma-separated depths (default: ~8 from 30%% to 100%% of depth)",
    )
    p.add_argument(
        "--exit-weights",
        default=None,
        help="comma-separated, one per exit (default uniform, the paper)",
    )
    p.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="self-distillation weight W in [0, 1]: each exit's loss = (1-W)*CE +\n"
        "W*KL(untrained model's full-depth distribution || exit); 0 = CE only (the paper)",
    )
    p.add_argument(
        "--distill-tokens",
        choices=("response", "all"),
        default="response",
        help="positions the KL covers: the response only, or every token (prompt too)",
    )
    add_balcony_arguments(p)
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    p.add_argument(
        "--save-delta",
        action="store_true",
        help="LoRA: save only soft.json + soft_delta.safetensors (bf16)",
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%%)")
    p.add_argument("--max-length", type=int, default=512, help="truncate sequences (tokens)")
    p.add_argument("--on-bad-record", choices=("skip", "error"), default="skip")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, or CPU w/ AVX512)")
    p.add_argument("--save-every", type=int, default=50, help="resumable checkpoint period")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_ints(text: str | None, what: str, parser: argparse.ArgumentParser) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--{what} must be comma-separated integers, got {text!r}")


def load_causal_lm(spec: str) -> tuple[Any, Any, str]:
    """transformers model + tokenizer for any spec models.load accepts (fp32).
    Returns (model, tokenizer, base_model name to record)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = loader.resolve(spec)
    soft = read_soft_json(directory, None)
    weights_dir, delta = directory, directory / DELTA
    if delta.exists() and not (directory / "config.json").exists():
        assert soft is not None and soft.base_model, f"{directory}: delta without base_model"
        weights_dir = loader.resolve(soft.base_model)
    model = AutoModelForCausalLM.from_pretrained(str(weights_dir), dtype=torch.float32)
    if weights_dir != directory:
        state = model.state_dict()
        apply_delta(state, delta)
        model.load_state_dict(state)
    tok_dir = directory if (directory / "tokenizer_config.json").exists() else weights_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    base = spec if spec in ("default", loader.BASE_NAME) else str(Path(spec).resolve())
    return model, tokenizer, base


def add_lora(model: Any, rank: int, alpha: float) -> Any:
    """Inject peft LoRA into every attention/MLP projection; the final norm trains too.
    Returns the PeftModel (whose base model is `model`, modified in place)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,  # type: ignore[arg-type]
                     target_modules=list(LORA_TARGETS), bias="none")  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    model.model.norm.weight.requires_grad_(True)  # type: ignore[union-attr]
    return peft_model


def lora_delta(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
    """(full tensors, {hf_name: (A, B)}, scale) of a peft-injected model, bf16 LoRA."""
    from peft.tuners.lora import Linear as LoraLinear

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scale = 1.0
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            factors: Any = (mod.lora_A, mod.lora_B)
            a = factors[0]["default"].weight.detach()  # (r, in)
            b = factors[1]["default"].weight.detach()  # (out, r)
            scale = float(mod.scaling["default"])
            lora[f"{name}.weight"] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
    full = {"model.norm.weight": model.model.norm.weight.detach().float().clone()}  # type: ignore
    return full, lora, scale


# -- training -------------------------------------------------------------------------


def exits_and_weights(args: argparse.Namespace, parser: argparse.ArgumentParser,
                      num_layers: int) -> tuple[list[int], list[float] | None]:  # fmt: skip
    """The run's exits (ascending; full depth added where the method keeps its head) and
    --exit-weights, checked (exit 2 with a message when they do not fit)."""
    exits = parse_ints(args.exits, "exits", parser) or list(default_exits(num_layers))
    if args.method == "sft":
        exits = [num_layers]
    if not exits or sorted(set(exits)) != exits or exits[0] < 1 or exits[-1] > num_layers:
        parser.error(f"--exits must be ascending distinct depths in 1..{num_layers}, got {exits}")
    if args.method == "early-exit" and exits[-1] != num_layers:
        exits.append(num_layers)  # full depth keeps the model's own head
    weights = None
    if args.exit_weights is not None:
        try:
            weights = [float(x) for x in args.exit_weights.split(",")]
        except ValueError:
            parser.error(f"--exit-weights must be comma-separated numbers: {args.exit_weights}")
        if len(weights) != len(exits) or min(weights) < 0 or sum(weights) <= 0:
            parser.error(f"--exit-weights needs {len(exits)} non-negative numbers (one per exit)")
    return exits, weights


def sorted_loss_module(args: argparse.Namespace, parser: argparse.ArgumentParser, model: Any,
                       exits: list[int], weights: list[float] | None
                       ) -> tuple[SortedLoss, Any]:  # fmt: skip
    """What trains for soft / sft / early-exit: LoRA or the full model or new exit heads,
    inside the sorted loss (with the untrained model as teacher for --distill).
    Returns (the loss module, the PeftModel or None)."""
    peft_model = None
    exit_heads: nn.ModuleDict | None = None
    if args.method == "early-exit":
        if args.lora_rank:
            parser.error("--method early-exit trains heads only; drop --lora-rank")
        model.requires_grad_(False)
        exit_heads = nn.ModuleDict({
            str(d): ExitHeadModule(model.model.norm, model.lm_head) for d in exits[:-1]
        })  # fmt: skip
    elif args.lora_rank:
        peft_model = add_lora(model, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank)
    elif args.save_delta:
        parser.error("--save-delta needs --lora-rank")
    # before checkpointing, SortedLoss's hooks and --resume: the untrained model, as is
    teacher = FrozenTeacher(model, peft_model) if args.distill > 0 else None
    if args.gradient_checkpointing and args.method != "early-exit":
        enable = getattr(model, "activation_checkpointing_enable", None)
        enable = enable or model.gradient_checkpointing_enable  # transformers < 5.x name
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft_model is not None:
            model.enable_input_require_grads()
    wrapper = SortedLoss(model, exits, weights, exit_heads, args.method == "early-exit",
                         args.distill, teacher, args.distill_tokens == "all")  # fmt: skip
    return wrapper, peft_model


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainResult:
    from accelerate import Accelerator
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo under torchrun
    model, tokenizer, base_name = load_causal_lm(args.model)
    num_layers = model.config.num_hidden_layers
    exits, weights = exits_and_weights(args, parser, num_layers)
    try:
        data = load_mixture(args.data, tokenizer, args.max_length, args.on_bad_record,
                            parse_range(args.records))  # fmt: skip
    except (DataError, ValueError) as e:
        parser.error(str(e))
    if args.method == "balcony":
        from models.training.balcony import train_balcony

        if exits[-1] != num_layers:
            exits.append(num_layers)  # full depth: the base itself
        args.cache_exits = parse_ints(args.cache_exits, "cache-exits", parser)
        return cast(TrainResult, train_balcony(args, parser, model, tokenizer, base_name,
                                               exits, data))  # fmt: skip

    # 1) what trains (and, for self-distillation, the untrained teacher)
    wrapper, peft_model = sorted_loss_module(args, parser, model, exits, weights)
    wrapper.train()
    params = [p for p in wrapper.parameters() if p.requires_grad]

    # 2) resume before wrapping (the saved names are the unwrapped module's)
    out: Path = args.out
    opt, sched, step, history, commands = resume.start(args, parser, wrapper)
    if step and acc.is_main_process:
        log.info("resumed from %s at step %d", out / RESUME_DIR, step)
    dist_model, opt = acc.prepare(wrapper, opt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # 3) the loop: one forward per micro-batch, all exits; step-indexed data order
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress or not acc.is_main_process,
               desc=f"{args.method}", dynamic_ncols=True)  # fmt: skip
    t0, first_step = time.time(), step
    while step < args.steps:
        micro = step_batches(data.examples, step, args.batch_size, args.grad_accum,
                             acc.process_index, acc.num_processes, args.seed)  # fmt: skip
        per_exit, kl = sorted_step(args, acc, dist_model, micro, pad_id, len(exits))
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append({str(d): x for d, x in zip(exits, per_exit, strict=True)})
        bar.update(1)
        shown = " ".join(f"{d}:{x:.2f}" for d, x in zip(exits, per_exit, strict=True))
        if args.distill > 0:
            shown += f" kl:{kl:.2f}"
        bar.set_postfix_str(shown)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            if acc.is_main_process:
                save_resume(out, acc.unwrap_model(dist_model), opt, sched, step, history, commands)
            acc.wait_for_everyone()
    bar.close()
    elapsed = time.time() - t0
    final = {d: final_loss(history, d) for d in exits}

    # 4) the checkpoint
    if acc.is_main_process:
        training = training_record(args, exits, weights, base_name, data, commands, step,
                                   acc.num_processes, elapsed / max(step - first_step, 1),
                                   final)  # fmt: skip
        save_output(args, out, acc.unwrap_model(dist_model), peft_model, tokenizer,
                    SoftConfig(method=args.method, exits=tuple(exits), base_model=base_name,
                               training=training))  # fmt: skip
    acc.wait_for_everyone()
    return TrainResult(out, step, tuple(exits), final)


def sorted_step(args: argparse.Namespace, acc: Any, dist_model: Any, micro: list[list[Any]],
                pad_id: int, num_exits: int) -> tuple[list[float], float]:  # fmt: skip
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate; the
    last one syncs across ranks). Returns the per-exit loss per target token and the mean
    distillation KL per distilled token (0.0 without distillation)."""
    device = acc.device
    tokens = sum(e.num_targets for mb in micro for e in mb)
    kl_tokens = (sum(len(e.input_ids) - 1 for mb in micro for e in mb)
                 if args.distill_tokens == "all" else tokens)  # fmt: skip
    sums, kl_sums = torch.zeros(num_exits), torch.zeros(num_exits)
    for j, mb in enumerate(micro):
        batch = collate(mb, pad_id)
        ctx = acc.no_sync(dist_model) if j < len(micro) - 1 else nullcontext()
        with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            res = dist_model(
                batch.input_ids.to(device),
                batch.labels.to(device),
                batch.attention_mask.to(device),
                normaliser=max(tokens, 1),
                kl_normaliser=max(kl_tokens, 1),
            )
            acc.backward(res.loss)
        sums += res.per_exit.float().cpu()
        if res.per_exit_kl is not None:
            kl_sums += res.per_exit_kl.float().cpu()
    return (sums / max(tokens, 1)).tolist(), float(kl_sums.mean()) / max(kl_tokens, 1)


def training_record(
    args: argparse.Namespace, exits: list[int], weights: list[float] | None, base_name: str,
    data: Any, commands: list[str], step: int, world: int, seconds_per_step: float,
    final: dict[int, float],
) -> dict[str, Any]:  # fmt: skip
    """soft.json's `training` entry of a sorted-loss run: what ran, on what, how long."""
    return {
        "method": args.method, "exits": exits, "exit_weights": weights,
        "base_model": base_name, "data_sha256": data.sha256,
        "data": args.data if len(args.data) > 1 else args.data[0],
        "records": args.records or ":", "examples": len(data.examples),
        "bad_records": len(data.bad), "command": args.command, "commands": commands,
        "steps": step, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "world_size": world, "lr": args.lr, "max_length": args.max_length,
        "lora_rank": args.lora_rank, "bf16": args.bf16, "distill": args.distill,
        "distill_tokens": args.distill_tokens,
        "seconds_per_step": round(seconds_per_step, 3),
        "cpu_hours": round(time.process_time() / 3600, 4),  # this process, all threads
        "final_losses": {str(d): round(v, 4) for d, v in final.items()},
    }  # fmt: skip


def save_output(args: argparse.Namespace, out: Path, wrapper: Any, peft_model: Any,
                tokenizer: Any, soft: SoftConfig) -> None:  # fmt: skip
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = wrapper.causal_lm  # type: ignore[union-attr]
    if peft_model is not None and args.save_delta:
        full, lora, scale = lora_delta(model)
        save_delta(out / DELTA, full, lora, scale)
        tokenizer.save_pretrained(str(out))
        write_soft_json(out, soft)
        return
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # a directory every HF-format reader loads as it is: transformers 4.x, vLLM and
    # llama.cpp's converter (rope_theta beside transformers 5's rope_parameters)
    config = json.loads((out / "config.json").read_text())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = loader.portable_config(config, type(model).__name__, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    loader.portable_tokenizer_config(out)
    if soft.method == "early-exit":
        heads: dict[str, torch.Tensor] = {}
        for d, eh in wrapper.exit_heads.items():  # type: ignore[union-attr]
            heads[f"exits.{d}.norm.weight"] = eh.norm.weight.detach().float().contiguous()
            heads[f"exits.{d}.lm_head.weight"] = eh.lm_head.weight.detach().to(
                torch.bfloat16).contiguous()  # fmt: skip
        save_file(heads, str(out / EXIT_HEADS))
    write_soft_json(out, soft)  # full weights are self-contained: base_model is provenance


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join(["soft-train", *(sys.argv[1:] if argv is None else argv)])
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1 or args.max_length < 2:
        parser.error("--steps, --batch-size, --grad-accum must be >= 1 and --max-length >= 2")
    if args.lora_rank < 0:
        parser.error("--lora-rank must be >= 0")
    if not 0.0 <= args.distill <= 1.0:
        parser.error(f"--distill must be in [0, 1], got {args.distill}")
    from models.training.data import split_spec

    for spec in args.data:
        if not split_spec(spec)[0].is_file():
            parser.error(f"--data {spec}: no such file (try `make data`)")
    if args.method == "balcony" and (args.lora_rank or args.distill or args.save_delta):
        parser.error(
            "--method balcony trains exit layers only: drop --lora-rank/--distill/--save-delta"
        )
    if args.method != "balcony" and (args.init_from or args.eval_data):
        parser.error("--init-from and --eval-data belong to --method balcony")
    if args.head_exact < 0 or args.head_samples < 0 or args.teacher_k < 1:
        parser.error("--head-exact and --head-samples must be >= 0, --teacher-k >= 1")
    if not args.eval_every > 0 or args.eval_max_length < 2:
        parser.error("--eval-every must be > 0 and --eval-max-length >= 2")
    for spec in args.eval_data or []:
        if not split_spec(spec)[0].is_file():
            parser.error(f"--eval-data {spec}: no such file (try `make data`)")
    try:
        loader.resolve(args.model)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--model: {e}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = train(args, parser)
    if res.out.exists():
        log.info("wrote %s (%d steps, exits %s)", res.out, res.steps, list(res.exits))


if __name__ == "__main__":
    main()
