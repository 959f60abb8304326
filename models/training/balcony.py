"""Exit layers on a frozen base (`soft-train --method balcony`), trained on a teacher cache.

"Balcony" (Jamialahmadi, Kavehzadeh et al., EMNLP 2025): the pretrained model stays
frozen; each exit e gets one new decoder layer, so sub-model e is base layers [0, e) →
exit layer e → the model's own final norm and LM head, and full depth is the base, bit
for bit. The exit layers learn by self-distillation: KL(full model ‖ exit) per token.

The base never changes, so its forward runs once per sequence, not once per epoch: a
`TeacherCache` keeps, for every token, the residual stream entering each exit layer and
the teacher's next-token distribution as its top-k log-probabilities plus the log of the
mass outside them (KL over the k + 1 outcomes: a faithful coarsening of the full KL).
Training then runs only the exit layers, the frozen norm and head, and the KL.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.training.data import Example

CACHE_FORMAT = "soft-teacher-cache/1"
HEAD_CHUNK = 1024  # tokens per head + KL chunk: bounds the (chunk, V) logits alive at once


# -- the teacher cache ----------------------------------------------------------------


def model_checksum(model: nn.Module) -> str:
    """sha256 over the frozen base's parameters (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(base_sha: str, examples: Sequence[Example], exits: Sequence[int], k: int) -> str:
    """What a cache depends on: the base, the exact token sequences, the exits and k."""
    h = hashlib.sha256(f"{CACHE_FORMAT} {base_sha} {list(exits)} {k}".encode())
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


@dataclass
class TeacherCache:
    """Memory-mapped per-token arrays of one data set under one base model.

    Arrays (N tokens over all sequences, in order): `tokens` (N,) int32; `offsets` (S+1,)
    int64, sequence s is tokens[offsets[s]:offsets[s+1]]; `hidden[e]` (N, H) float16, the
    residual stream after base layer e-1 (what exit layer e reads); `top_ids` (N, k) int32
    and `top_logp` (N, k) float16, the teacher's k most likely next tokens and their
    log-probabilities; `rest_logp` (N,) float32, log of the teacher's remaining mass.
    """

    directory: Path
    exits: tuple[int, ...]
    tokens: np.ndarray
    offsets: np.ndarray
    hidden: dict[int, np.ndarray]
    top_ids: np.ndarray
    top_logp: np.ndarray
    rest_logp: np.ndarray

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    @classmethod
    def open(cls, directory: Path) -> TeacherCache:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or not meta.get("complete"):
            raise ValueError(f"{directory}: not a complete {CACHE_FORMAT} (delete it to rebuild)")
        n, hsz, k = meta["tokens"], meta["hidden_size"], meta["k"]

        def arr(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            return np.memmap(directory / f"{name}.bin", dtype=dtype, mode="c", shape=shape)

        exits = tuple(meta["exits"])
        return cls(
            directory=directory,
            exits=exits,
            tokens=arr("tokens", np.int32, (n,)),
            offsets=np.asarray(meta["offsets"], dtype=np.int64),
            hidden={e: arr(f"hidden_{e}", np.float16, (n, hsz)) for e in exits},
            top_ids=arr("top_ids", np.int32, (n, k)),
            top_logp=arr("top_logp", np.float16, (n, k)),
            rest_logp=arr("rest_logp", np.float32, (n,)),
        )


def build_cache(
    causal_lm: Any,
    examples: Sequence[Example],
    exits: Sequence[int],
    k: int,
    root: Path,
    batch_tokens: int = 2048,
    progress: bool = True,
) -> TeacherCache:
    """Run the frozen base once over `examples` and store what the exit layers train on.

    Args:
        causal_lm: the transformers model (frozen, eval mode).
        examples: token sequences, in the order the cache keeps them.
        exits: the exit depths that get an exit layer (each < the model's depth).
        k: teacher log-probabilities kept per token.
        root: caches live in root/<key>/, key = base checksum + data + exits + k;
            an existing complete cache with that key is reused.
    Returns:
        The opened cache.
    """
    from tqdm import tqdm

    key = cache_key(model_checksum(causal_lm), examples, exits, k)
    directory = Path(root) / key
    if (directory / "meta.json").exists():
        try:
            return TeacherCache.open(directory)
        except ValueError:
            pass  # an interrupted build: start again
    directory.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n, hsz = int(offsets[-1]), int(causal_lm.config.hidden_size)

    def arr(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.memmap(directory / f"{name}.bin", dtype=dtype, mode="w+", shape=shape)

    tokens = arr("tokens", np.int32, (n,))
    hidden = {e: arr(f"hidden_{e}", np.float16, (n, hsz)) for e in exits}
    top_ids, top_logp = arr("top_ids", np.int32, (n, k)), arr("top_logp", np.float16, (n, k))
    rest_logp = arr("rest_logp", np.float32, (n,))
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    batches: list[list[int]] = []
    cur: list[int] = []
    for s in order:
        if cur and (len(cur) + 1) * lengths[s] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(int(s))
    batches.append(cur)
    bar = tqdm(total=n, unit="tok", desc="teacher cache", disable=not progress)
    with torch.inference_mode():
        for batch in batches:
            t = int(lengths[batch].max())
            ids = torch.zeros(len(batch), t, dtype=torch.long)
            mask = torch.zeros(len(batch), t, dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, : lengths[s]] = torch.tensor(examples[s].input_ids)
                mask[j, : lengths[s]] = 1
            dev = causal_lm.device
            out = causal_lm(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                            output_hidden_states=True)  # fmt: skip
            logp = F.log_softmax(out.logits.float(), dim=-1)  # (B, T, V)
            top_v, top_i = (x.cpu() for x in logp.topk(k, dim=-1))
            rest = log1mexp(torch.logsumexp(top_v, dim=-1))
            states = {e: out.hidden_states[e].float().cpu() for e in exits}
            for j, s in enumerate(batch):
                lo, hi, m = int(offsets[s]), int(offsets[s + 1]), int(lengths[s])
                tokens[lo:hi] = ids[j, :m].numpy()
                for e in exits:
                    h = states[e][j, :m]
                    assert torch.isfinite(h.half()).all(), f"exit {e}: residual overflows fp16"
                    hidden[e][lo:hi] = h.half().numpy()
                top_ids[lo:hi] = top_i[j, :m].numpy()
                top_logp[lo:hi] = top_v[j, :m].half().numpy()
                rest_logp[lo:hi] = rest[j, :m].numpy()
            bar.update(int(lengths[batch].sum()))
    bar.close()
    for a in (tokens, top_ids, top_logp, rest_logp, *hidden.values()):
        a.flush()  # type: ignore[attr-defined]  # an np.memmap
    meta = {"format": CACHE_FORMAT, "complete": True, "tokens": n, "hidden_size": hsz, "k": k,
            "exits": list(exits), "offsets": offsets.tolist()}  # fmt: skip
    (directory / "meta.json").write_text(json.dumps(meta))
    return TeacherCache.open(directory)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; -inf-safe when x == 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# -- the loss ---------------------------------------------------------------------------


def topk_kl(student_logits: Tensor, top_ids: Tensor, top_logp: Tensor, rest_logp: Tensor) -> Tensor:
    """Per-token KL(teacher ‖ student) over the teacher's top-k tokens and "the rest".

    Args:
        student_logits: (N, V).
        top_ids: (N, k) the teacher's top tokens; top_logp: (N, k) their log-probabilities;
        rest_logp: (N,) log of the teacher's mass outside them.
    Returns:
        (N,) KL in nats.
    """
    logq = F.log_softmax(student_logits.float(), dim=-1)
    q_top = logq.gather(-1, top_ids)  # (N, k)
    q_rest = log1mexp(torch.logsumexp(q_top, dim=-1))
    p_top, p_rest = top_logp.float(), rest_logp.float()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    return kl + p_rest.exp() * (p_rest - q_rest)


class HeadKL(torch.autograd.Function):
    """Summed `topk_kl` of `linear(h, head_w)`, with its gradient wrt h computed in the
    forward pass: dKL/dz = q - t, t = the teacher's probability on its top k and
    p_rest * q_v / q_rest elsewhere. Two head products per token (logits, then the
    gradient) instead of three with recomputation, and no (N, V) tensor kept for the
    backward pass — the head is most of a step's cost."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, head_w: Tensor, top_ids: Tensor, top_logp: Tensor,
                rest_logp: Tensor) -> Tensor:  # fmt: skip
        logq = F.log_softmax(F.linear(h, head_w).float(), dim=-1)  # (N, V)
        q_top = logq.gather(-1, top_ids)
        q_rest = log1mexp(torch.logsumexp(q_top, dim=-1))  # (N,)
        p_top, p_rest = top_logp.float(), rest_logp.float()
        kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
        # gradient wrt the logits, in place of logq: q - t
        q = logq.exp_()
        grad = q.mul_(1.0 - (p_rest - q_rest).exp()[:, None])  # rest tokens: q (1 - p_r/q_r)
        grad.scatter_(-1, top_ids, q_top.exp() - p_top.exp())  # top-k tokens: q - p
        ctx.save_for_backward(grad.to(h.dtype) @ head_w)  # (N, H)
        return kl.sum()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return grad_out * grad_h, None, None, None, None


class ExitLayers(nn.Module):
    """One trainable decoder layer per exit, run on cached residual streams."""

    def __init__(self, causal_lm: Any, exits: Sequence[int], init: str = "last") -> None:
        super().__init__()
        import copy

        base = causal_lm.model
        num_layers = len(base.layers)
        self.exits = tuple(exits)
        layers = {}
        for e in self.exits:
            src = {"last": num_layers - 1, "next": e}[init]
            layer = copy.deepcopy(base.layers[src])
            layer.self_attn.layer_idx = e
            layer.requires_grad_(True)
            layers[str(e)] = layer
        self.layers = nn.ModuleDict(layers)
        # frozen, shared with the base (not parameters of this module: never saved or trained)
        self._frozen = (base.norm, causal_lm.lm_head, base.rotary_emb)

    def forward(self, batch: CachedBatch) -> tuple[Tensor, dict[int, float]]:
        """Sum over exits of the mean per-token KL, and each exit's summed KL (a float).
        Every exit's layer sees the same tokens; the head runs in chunks (`HeadKL`), so
        no more than one chunk's (HEAD_CHUNK, V) logits live."""
        norm, lm_head, rotary = self._frozen
        valid = batch.mask.reshape(-1).bool()
        cos_sin = rotary(batch.hidden[self.exits[0]], batch.positions)
        total = batch.hidden[self.exits[0]].new_zeros(())
        per_exit = {}
        for e in self.exits:
            h = self.layers[str(e)](batch.hidden[e], attention_mask=batch.attn_mask,
                                    position_embeddings=cos_sin)  # fmt: skip
            flat = h.reshape(-1, h.shape[-1])[valid]  # (N, H) real tokens only
            x = norm(flat)
            kl = flat.new_zeros(())
            for lo in range(0, flat.shape[0], HEAD_CHUNK):
                sl = slice(lo, lo + HEAD_CHUNK)
                kl = kl + HeadKL.apply(x[sl], lm_head.weight, batch.top_ids[sl],
                                       batch.top_logp[sl], batch.rest_logp[sl])  # fmt: skip
            per_exit[e] = float(kl.detach())
            total = total + kl / batch.normaliser
        return total, per_exit


@dataclass
class CachedBatch:
    """A padded micro-batch read from the cache. hidden[e]: (B, T, H) fp32."""

    hidden: dict[int, Tensor]
    positions: Tensor  # (B, T)
    mask: Tensor  # (B, T) 1 on real tokens
    attn_mask: Tensor  # (B, 1, T, T) bool: causal and real keys only
    top_ids: Tensor  # (N, k) for the real tokens, row-major over (B, T)
    top_logp: Tensor
    rest_logp: Tensor
    normaliser: float  # tokens of the whole optimizer step (the loss is a per-token mean)


def read_batch(cache: TeacherCache, seqs: Sequence[int], normaliser: float,
               device: torch.device | str = "cpu") -> CachedBatch:  # fmt: skip
    lens = [cache.sequence(s).stop - cache.sequence(s).start for s in seqs]
    b, t = len(seqs), max(lens)
    mask = torch.zeros(b, t, dtype=torch.long)
    hidden = {e: torch.zeros(b, t, cache.hidden[e].shape[1]) for e in cache.exits}
    rows = []
    for j, s in enumerate(seqs):
        sl = cache.sequence(s)
        mask[j, : lens[j]] = 1
        for e in cache.exits:
            hidden[e][j, : lens[j]] = torch.from_numpy(np.asarray(cache.hidden[e][sl])).float()
        rows.append(np.arange(sl.start, sl.stop))
    idx = np.concatenate(rows)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    attn = causal[None, None] & mask.bool()[:, None, None, :]
    return CachedBatch(
        hidden={e: h.to(device) for e, h in hidden.items()},
        positions=torch.arange(t).expand(b, t).to(device),
        mask=mask.to(device),
        attn_mask=attn.to(device),
        top_ids=torch.from_numpy(np.asarray(cache.top_ids[idx])).long().to(device),
        top_logp=torch.from_numpy(np.asarray(cache.top_logp[idx])).to(device),
        rest_logp=torch.from_numpy(np.asarray(cache.rest_logp[idx])).to(device),
        normaliser=normaliser,
    )


def exit_layer_tensors(layers: ExitLayers, dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint's `exit_layers.safetensors`: `exits.{e}.<HF decoder-layer name>`."""
    out = {}
    for e, layer in layers.layers.items():
        for name, p in layer.state_dict().items():
            out[f"exits.{e}.{name}"] = p.detach().to(dtype).contiguous()
    return out


# -- the training run -------------------------------------------------------------------


def train_balcony(args: Any, parser: Any, causal_lm: Any, tokenizer: Any, base_name: str,
                  exits: list[int], data: Any) -> Any:  # fmt: skip
    """`soft-train --method balcony`: build (or reuse) the teacher cache, then train one
    exit layer per exit below full depth on it. Returns a TrainResult."""
    from tqdm import tqdm

    from models.checkpoint import EXIT_LAYERS, SoftConfig, write_soft_json
    from models.loader import cache_dir
    from models.training.data import step_batches
    from models.training.resume import save_resume, start
    from models.training.train import TrainResult, final_loss

    num_layers = causal_lm.config.num_hidden_layers
    trained = [e for e in exits if e < num_layers]
    if not trained:
        parser.error("--method balcony needs at least one exit below full depth")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    causal_lm.requires_grad_(False).eval().to(device)
    root = Path(args.cache_dir) if args.cache_dir else cache_dir() / "teacher"
    t_cache = time.time()
    cache = build_cache(causal_lm, data.examples, trained, args.teacher_k, root,
                        progress=not args.no_progress)  # fmt: skip
    cache_s = time.time() - t_cache
    layers = ExitLayers(causal_lm, trained, args.exit_init)
    layers.train()
    params = [p for p in layers.parameters() if p.requires_grad]
    out: Path = args.out
    opt, sched, step, history, commands = start(args, parser, layers)
    position = {id(e): s for s, e in enumerate(data.examples)}  # example -> cache sequence
    bar = tqdm(total=args.steps, initial=step, desc="balcony", dynamic_ncols=True,
               disable=args.no_progress)  # fmt: skip
    t0, first_step, tokens_seen = time.time(), step, 0
    while step < args.steps:
        micro = step_batches(data.examples, step, args.batch_size, args.grad_accum,
                             seed=args.seed)  # fmt: skip
        n_tok = sum(len(e.input_ids) for mb in micro for e in mb)
        sums = dict.fromkeys(trained, 0.0)
        for mb in micro:
            batch = read_batch(cache, [position[id(e)] for e in mb], float(n_tok), device)
            loss, per_exit = layers(batch)
            loss.backward()
            for e, v in per_exit.items():
                sums[e] += v
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_tok
        history.append({str(e): sums[e] / n_tok for e in trained})
        bar.update(1)
        bar.set_postfix_str(" ".join(f"{e}:{sums[e] / n_tok:.2f}" for e in trained))
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            save_resume(out, layers, opt, sched, step, history, commands)
    bar.close()
    elapsed = time.time() - t0
    final = {e: final_loss(history, e) for e in trained}
    training = {
        "method": "balcony", "exits": exits, "base_model": base_name,
        "data": [str(d) for d in args.data], "data_sha256": data.sha256,
        "examples": len(data.examples), "tokens": int(cache.offsets[-1]),
        "bad_records": len(data.bad), "command": args.command, "commands": commands,
        "steps": step, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "lr": args.lr, "max_length": args.max_length, "teacher_k": args.teacher_k,
        "exit_init": args.exit_init, "teacher_cache_seconds": round(cache_s, 1),
        "seconds_per_step": round(elapsed / max(step - first_step, 1), 3),
        "train_tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1),
        "final_kl": {str(e): round(v, 4) for e, v in final.items()},
    }  # fmt: skip
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in exit_layer_tensors(layers, torch.bfloat16).items()},
              str(out / EXIT_LAYERS))  # fmt: skip
    tokenizer.save_pretrained(str(out))
    write_soft_json(out, SoftConfig(method="balcony", exits=tuple(exits), base_model=base_name,
                                    training=training))  # fmt: skip
    return TrainResult(out, step, tuple(exits), final)
