"""Exit layers on a frozen base (`soft-train --method balcony`), trained on a teacher cache.

"Balcony" (Jamialahmadi, Kavehzadeh et al., EMNLP 2025): the pretrained model stays
frozen; each exit e gets one new decoder layer, so sub-model e is base layers [0, e) →
exit layer e → the model's own final norm and LM head, and full depth is the base, bit
for bit. The exit layers learn by self-distillation: KL(full model ‖ exit) per token.

The base never changes, so its forward runs once per sequence, not once per epoch: a
`TeacherCache` keeps, for every token, the residual stream entering each exit layer, the
teacher's final normed hidden state (its logits over any set of tokens are one small
product away), its log-normaliser and its top-k token ids. Caches are built in shards of
~64 k tokens, each complete on its own, so a long build resumes where it stopped.

The loss is the full-vocabulary KL(teacher ‖ exit), estimated without the vocabulary-sized
product (`sampled_kl`): every token of an exact set (the most frequent tokens of the data
plus the teacher's top-k of every token in the chunk) is computed exactly, the rest of the
vocabulary (the tail, where the teacher puts little mass) by a uniform sample of it with
importance weights, for the student's normaliser and for the KL's own tail terms. Both
estimates are unbiased for the tail's sums; `--head full` computes them exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.training.data import IGNORE, Example

CACHE_FORMAT = "soft-teacher-cache/2"
HEAD_CHUNK = 256  # tokens per head + KL chunk: fewer tokens, fewer distinct teacher top-k columns
SHARD_TOKENS = 65536  # tokens per cache shard (each shard is built and kept on its own)
CURVE = "curve.json"  # OUT/curve.json: held-out CE per exit against CPU-hours


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


def bytes_per_token(hidden_size: int, num_exits: int, k: int) -> int:
    """Disk a cache spends per token: fp16 residuals per exit and the final hidden state,
    k int32 ids, the token and the log-normaliser."""
    return 2 * hidden_size * (num_exits + 1) + 4 * k + 4 + 4


def _memmap(directory: Path, name: str, dtype: Any, shape: tuple[int, ...],
            mode: Literal["c", "w+"]) -> np.ndarray:  # fmt: skip
    """One cache array, `directory/name.bin`: "w+" to build it, "c" to read it."""
    return np.memmap(directory / f"{name}.bin", dtype=dtype, mode=mode, shape=shape)


@dataclass
class TeacherCache:
    """Memory-mapped per-token arrays of one shard of data under one base model.

    Arrays (N tokens over all sequences, in order): `tokens` (N,) int32; `offsets` (S+1,)
    int64, sequence s is tokens[offsets[s]:offsets[s+1]]; `hidden[e]` (N, H) float16, the
    residual stream after base layer e-1 (what exit layer e reads); `final` (N, H) float16,
    the base's final normed hidden state (teacher logits = final @ head.T); `logz` (N,)
    float32, the log-normaliser of those logits; `top_ids` (N, k) int32, the teacher's k
    most likely next tokens.
    """

    directory: Path
    exits: tuple[int, ...]
    tokens: np.ndarray
    offsets: np.ndarray
    hidden: dict[int, np.ndarray]
    final: np.ndarray
    logz: np.ndarray
    top_ids: np.ndarray
    cpu_s: float = 0.0  # CPU time (all threads) the teacher spent building it

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def sequence(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    @classmethod
    def open(cls, directory: Path) -> TeacherCache:
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{directory}: unreadable cache ({e}); delete it to rebuild") from e
        if meta.get("format") != CACHE_FORMAT or not meta.get("complete"):
            raise ValueError(f"{directory}: not a complete {CACHE_FORMAT} (delete it to rebuild)")
        n, hsz, k = meta["tokens"], meta["hidden_size"], meta["k"]

        def arr(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            return _memmap(directory, name, dtype, shape, "c")

        exits = tuple(meta["exits"])
        return cls(
            directory=directory,
            exits=exits,
            tokens=arr("tokens", np.int32, (n,)),
            offsets=np.asarray(meta["offsets"], dtype=np.int64),
            hidden={e: arr(f"hidden_{e}", np.float16, (n, hsz)) for e in exits},
            final=arr("final", np.float16, (n, hsz)),
            logz=arr("logz", np.float32, (n,)),
            top_ids=arr("top_ids", np.int32, (n, k)),
            cpu_s=float(meta.get("cpu_s", 0.0)),
        )


@dataclass
class ShardedCache:
    """Several `TeacherCache` shards read as one: sequence s of the whole data set lives in
    the shard whose first sequence is the largest one <= s."""

    shards: list[TeacherCache]
    starts: list[int]  # first global sequence of each shard
    built: frozenset[str] = frozenset()  # names of the shards this process built

    def counted_before(self, before: dict[str, Any] | None) -> frozenset[str]:
        """The shards whose build an --init-from checkpoint's `cpu_hours` counts already:
        those its record lists; for a record that lists none (older runs), the leading
        shards this process reused, up to the tokens that run cached."""
        if before is None:
            return frozenset()
        if "teacher_shards" in before:
            return frozenset(before["teacher_shards"])
        out, total = set(), 0
        for s in self.shards:
            name = s.directory.name
            if name in self.built or total + s.num_tokens > int(before.get("tokens", 0)):
                break
            out.add(name)
            total += s.num_tokens
        return frozenset(out)

    def reused_cpu_s(self, counted: frozenset[str]) -> float:
        """CPU seconds earlier processes spent building the shards reused here that no
        earlier record counts (`counted`)."""
        return sum(s.cpu_s for s in self.shards
                   if s.directory.name not in self.built | counted)  # fmt: skip

    @property
    def exits(self) -> tuple[int, ...]:
        return self.shards[0].exits

    @property
    def num_sequences(self) -> int:
        return self.starts[-1] + self.shards[-1].num_sequences

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.shards)

    def locate(self, s: int) -> tuple[TeacherCache, int]:
        j = bisect_right(self.starts, s) - 1
        return self.shards[j], s - self.starts[j]

    def token_counts(self, vocab: int) -> np.ndarray:
        """How often each token id occurs in the cached data (for the exact head set)."""
        counts = np.zeros(vocab, dtype=np.int64)
        for sh in self.shards:
            counts += np.bincount(np.asarray(sh.tokens), minlength=vocab)[:vocab]
        return counts


def shard_bounds(examples: Sequence[Example], shard_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) example ranges of about `shard_tokens` tokens each."""
    bounds, lo, acc = [], 0, 0
    for i, e in enumerate(examples):
        acc += len(e.input_ids)
        if acc >= shard_tokens:
            bounds.append((lo, i + 1))
            lo, acc = i + 1, 0
    if lo < len(examples):
        bounds.append((lo, len(examples)))
    return bounds


def build_cache(
    causal_lm: Any,
    examples: Sequence[Example],
    exits: Sequence[int],
    k: int,
    root: Path,
    batch_tokens: int = 4096,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
) -> ShardedCache:
    """Run the frozen base once over `examples` and store what the exit layers train on.

    Args:
        causal_lm: the transformers model (frozen, eval mode).
        examples: token sequences, in the order the cache keeps them.
        exits: the exit depths that get an exit layer (each < the model's depth).
        k: teacher top-k token ids kept per token.
        root: shards live in root/<key>/, key = base checksum + the shard's data + exits +
            k; an existing complete shard with that key is reused, so an interrupted build
            resumes at its first missing shard.
        shard_tokens: about how many tokens a shard holds.
    Returns:
        The shards, opened as one cache.
    """
    from tqdm import tqdm

    base_sha = model_checksum(causal_lm)
    bounds = shard_bounds(examples, shard_tokens)
    total = sum(len(e.input_ids) for e in examples)
    bar = tqdm(total=total, unit="tok", desc="teacher cache", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    shards, built = [], set()
    for lo, hi in bounds:
        part = examples[lo:hi]
        directory = Path(root) / cache_key(base_sha, part, exits, k)
        try:
            shard = TeacherCache.open(directory)
        except ValueError:
            shard = _build_shard(causal_lm, part, exits, k, directory, batch_tokens, bar)
            built.add(directory.name)
        else:
            bar.update(shard.num_tokens)
        shards.append(shard)
    bar.close()
    return ShardedCache(shards, [lo for lo, _ in bounds], frozenset(built))


@torch.inference_mode()
def _build_shard(causal_lm: Any, examples: Sequence[Example], exits: Sequence[int], k: int,
                 directory: Path, batch_tokens: int, bar: Any) -> TeacherCache:  # fmt: skip
    spent = time.process_time()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)  # incomplete until the end
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n, hsz = int(offsets[-1]), int(causal_lm.config.hidden_size)

    def arr(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return _memmap(directory, name, dtype, shape, "w+")

    tokens = arr("tokens", np.int32, (n,))
    hidden = {e: arr(f"hidden_{e}", np.float16, (n, hsz)) for e in exits}
    final, logz = arr("final", np.float16, (n, hsz)), arr("logz", np.float32, (n,))
    top_ids = arr("top_ids", np.int32, (n, k))
    head_w = causal_lm.lm_head.weight.float()
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    batches: list[list[int]] = []
    cur: list[int] = []
    for s in order:
        if cur and (len(cur) + 1) * lengths[s] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(int(s))
    batches.append(cur)
    dev = causal_lm.device
    for batch in batches:
        t = int(lengths[batch].max())
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        mask = torch.zeros(len(batch), t, dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, : lengths[s]] = torch.tensor(examples[s].input_ids)
            mask[j, : lengths[s]] = 1
        out = causal_lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                              output_hidden_states=True)  # fmt: skip
        # the head runs on the fp16-rounded state training will read: logits, normaliser
        # and top-k agree with what the loss recomputes from the cache
        fin = out.last_hidden_state.half()
        if not torch.isfinite(fin).all():
            raise ValueError("the base's final hidden state overflows fp16")
        states = {e: out.hidden_states[e].half() for e in exits}
        for e, h in states.items():
            if not torch.isfinite(h).all():
                raise ValueError(f"exit {e}: the residual stream overflows fp16")
        for j, s in enumerate(batch):
            m = int(lengths[s])
            lo, hi = int(offsets[s]), int(offsets[s + 1])
            logits = F.linear(fin[j, :m].float(), head_w)  # (m, V)
            tokens[lo:hi] = ids[j, :m].numpy()
            final[lo:hi] = fin[j, :m].cpu().numpy()
            logz[lo:hi] = torch.logsumexp(logits, dim=-1).cpu().numpy()
            top_ids[lo:hi] = logits.topk(k, dim=-1).indices.cpu().numpy()
            for e in exits:
                hidden[e][lo:hi] = states[e][j, :m].cpu().numpy()
        bar.update(int(lengths[batch].sum()))
    for a in (tokens, final, logz, top_ids, *hidden.values()):
        a.flush()  # type: ignore[attr-defined]  # an np.memmap
    meta = {"format": CACHE_FORMAT, "complete": True, "tokens": n, "hidden_size": hsz, "k": k,
            "exits": list(exits), "offsets": offsets.tolist(),
            "cpu_s": round(time.process_time() - spent, 1)}  # fmt: skip
    (directory / "meta.json").write_text(json.dumps(meta))
    return TeacherCache.open(directory)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; -inf-safe when x == 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# -- the loss ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadColumns:
    """The vocabulary columns a chunk's loss evaluates: `ids[:exact]` exactly, the rest a
    uniform sample (without replacement) of the `tail` tokens outside them, each standing
    for tail / (len(ids) - exact) tokens (`log_weight`). ids None: the whole vocabulary."""

    ids: Tensor | None
    exact: int
    log_weight: Tensor | None  # (len(ids),): 0 on exact columns, log(tail / samples) else


def head_columns(vocab: int, exact: Tensor | None, top_ids: Tensor, samples: int,
                 generator: torch.Generator | None = None) -> HeadColumns:  # fmt: skip
    """Columns for one chunk: `exact` (e.g. the data's most frequent tokens) plus every
    token's teacher top-k, exactly; `samples` uniform draws of the remaining tail.

    Args:
        vocab: the vocabulary size.
        exact: 1-D ids always computed exactly, or None for the full vocabulary.
        top_ids: (N, k) the chunk's teacher top-k ids.
        samples: tail tokens drawn for the estimate (0: the tail is ignored, biased).
    """
    if exact is None:
        return HeadColumns(None, vocab, None)
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[exact] = True
    keep[top_ids.reshape(-1).cpu()] = True
    exact_ids = keep.nonzero().squeeze(1)
    tail = (~keep).nonzero().squeeze(1)
    m = min(samples, tail.numel())
    drawn = tail[torch.randperm(tail.numel(), generator=generator)[:m]]
    log_w = torch.zeros(exact_ids.numel() + m)
    if m:
        log_w[exact_ids.numel() :] = math.log(tail.numel() / m)
    return HeadColumns(torch.cat([exact_ids, drawn]), exact_ids.numel(), log_w)


def sampled_kl(x: Tensor, head_w: Tensor, teacher_logp: Tensor, log_weight: Tensor | None
               ) -> Tensor:  # fmt: skip
    """Per-token KL(teacher ‖ student) over the vocabulary, from the chosen columns.

    Args:
        x: (N, H) the student's normed hidden states (requires grad).
        head_w: (C, H) the head's rows of the chosen columns (frozen).
        teacher_logp: (N, C) the teacher's exact log-probabilities on those columns.
        log_weight: (C,) log of how many tokens each column stands for (None: all 1).
    Returns:
        (N,) the estimate: exact where every column is exact, else sum_c w_c p_c
        (log p_c - log q_c) with log q = z - log(sum_c w_c exp z_c) — the tail's sums
        estimated by importance weights, unbiased for each sum.
    """
    return cast(Tensor, _SampledKL.apply(x, head_w, teacher_logp, log_weight))


class _SampledKL(torch.autograd.Function):
    """`sampled_kl` with its gradient wrt x computed in the forward pass: with
    q~_c = w_c exp(z_c) / sum w exp z and P = sum_c w_c p_c, dKL/dz_c = P q~_c - w_c p_c.
    One (N, C) buffer reused in place, no (N, C) tensor kept for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, head_w: Tensor, teacher_logp: Tensor,
                log_weight: Tensor | None) -> Tensor:  # fmt: skip
        z = F.linear(x.detach(), head_w).float()  # (N, C)
        if log_weight is not None:
            z.add_(log_weight.to(z.device))  # z + log w: the weighted logits
        logz = torch.logsumexp(z, dim=-1, keepdim=True)  # log sum w exp z
        lw = 0.0 if log_weight is None else log_weight.to(z.device)
        pw = (teacher_logp + lw).exp()  # w p
        # log q_c = z_c - logZ = (z_c + log w_c) - log w_c - logZ
        kl = (pw * (teacher_logp + lw - z + logz)).sum(-1)  # sum w p (log p - log q)
        big_p = pw.sum(-1, keepdim=True)
        grad = z.sub_(logz).exp_().mul_(big_p).sub_(pw)  # P q~ - w p
        ctx.save_for_backward(grad.to(x.dtype) @ head_w)  # (N, H)
        return kl

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad_x,) = ctx.saved_tensors
        return grad_out[:, None] * grad_x, None, None, None


class ExitLayers(nn.Module):
    """One trainable decoder layer per exit, run on cached residual streams."""

    def __init__(self, causal_lm: Any, exits: Sequence[int], init: str = "last") -> None:
        super().__init__()
        import copy

        base = causal_lm.model
        num_layers = len(base.layers)
        self.exits = tuple(exits)
        self._base_layers = tuple(base.layers)  # frozen: bridge a cached depth to an exit
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

    @property
    def head_weight(self) -> Tensor:
        """The base's frozen LM head, (V, H)."""
        return self._frozen[1].weight

    def normed(self, batch: CachedBatch) -> dict[int, Tensor]:
        """Each exit's final-normed hidden state of the batch's real tokens, (N, H)."""
        norm, _, rotary = self._frozen
        valid = batch.mask.reshape(-1).bool()
        cos_sin = rotary(next(iter(batch.hidden.values())), batch.positions)
        out, known = {}, dict(batch.hidden)  # the exits ascend: a bridge continues the last
        for e in self.exits:
            h = self.layers[str(e)](self.residual(batch, e, cos_sin, known),
                                    attention_mask=batch.attn_mask,
                                    position_embeddings=cos_sin)  # fmt: skip
            out[e] = norm(h.reshape(-1, h.shape[-1])[valid])
        return out

    def residual(self, batch: CachedBatch, depth: int, cos_sin: Any,
                 known: dict[int, Tensor] | None = None) -> Tensor:  # fmt: skip
        """The base's residual stream after `depth` layers: known (`known`: the cache's
        depths, and any bridged before; by default the cache's), or the deepest known depth
        below it run through the frozen base layers in between (no gradient), which `known`
        then holds too."""
        known = dict(batch.hidden) if known is None else known
        if depth in known:
            return known[depth]
        below = max(d for d in known if d < depth)
        h = known[below]
        with torch.no_grad():
            for layer in self._base_layers[below:depth]:
                h = layer(h, attention_mask=batch.attn_mask, position_embeddings=cos_sin)
        known[depth] = h
        return h

    def forward(self, batch: CachedBatch, exact: Tensor | None = None, samples: int = 0,
                generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[int, float]]:  # fmt: skip
        """Sum over exits of the mean per-token KL, and each exit's summed KL (a float).

        The head runs in chunks of HEAD_CHUNK tokens on the columns `head_columns` picks
        (`exact` None: the whole vocabulary, the exact KL); the columns and the teacher's
        log-probabilities on them are shared by every exit of the chunk.
        """
        xs = self.normed(batch)
        w = self.head_weight
        n = batch.final.shape[0]
        total = batch.final.new_zeros(())
        per_exit = dict.fromkeys(self.exits, 0.0)
        for lo in range(0, n, HEAD_CHUNK):
            sl = slice(lo, lo + HEAD_CHUNK)
            cols = head_columns(w.shape[0], exact, batch.top_ids[sl], samples, generator)
            wc = w if cols.ids is None else w[cols.ids.to(w.device)]
            with torch.no_grad():
                t_logp = F.linear(batch.final[sl], wc).float() - batch.logz[sl, None]
            for e in self.exits:
                kl = sampled_kl(xs[e][sl], wc, t_logp, cols.log_weight).sum()
                per_exit[e] += float(kl.detach())
                total = total + kl / batch.normaliser
        return total, per_exit


@dataclass
class CachedBatch:
    """A padded micro-batch read from the cache. hidden[e]: (B, T, H) fp32."""

    hidden: dict[int, Tensor]
    positions: Tensor  # (B, T)
    mask: Tensor  # (B, T) 1 on real tokens
    attn_mask: Tensor  # (B, 1, T, T) bool: causal and real keys only
    final: Tensor  # (N, H) the teacher's final normed state, real tokens row-major over (B, T)
    logz: Tensor  # (N,)
    top_ids: Tensor  # (N, k)
    normaliser: float  # tokens of the whole optimizer step (the loss is a per-token mean)


def read_batch(cache: ShardedCache, seqs: Sequence[int], normaliser: float,
               device: torch.device | str = "cpu") -> CachedBatch:  # fmt: skip
    parts = [cache.locate(s) for s in seqs]
    lens = [sh.sequence(i).stop - sh.sequence(i).start for sh, i in parts]
    b, t = len(seqs), max(lens)
    mask = torch.zeros(b, t, dtype=torch.long)
    hidden = {e: torch.zeros(b, t, cache.shards[0].hidden[e].shape[1]) for e in cache.exits}
    final, logz, top = [], [], []
    for j, (sh, i) in enumerate(parts):
        sl = sh.sequence(i)
        mask[j, : lens[j]] = 1
        for e in cache.exits:
            hidden[e][j, : lens[j]] = torch.from_numpy(np.asarray(sh.hidden[e][sl])).float()
        final.append(torch.from_numpy(np.asarray(sh.final[sl])).float())
        logz.append(torch.from_numpy(np.asarray(sh.logz[sl])))
        top.append(torch.from_numpy(np.asarray(sh.top_ids[sl])).long())
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    attn = causal[None, None] & mask.bool()[:, None, None, :]
    return CachedBatch(
        hidden={e: h.to(device) for e, h in hidden.items()},
        positions=torch.arange(t).expand(b, t).to(device),
        mask=mask.to(device),
        attn_mask=attn.to(device),
        final=torch.cat(final).to(device),
        logz=torch.cat(logz).to(device),
        top_ids=torch.cat(top).to(device),
        normaliser=normaliser,
    )


def exit_layer_tensors(layers: ExitLayers, dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint's `exit_layers.safetensors`: `exits.{e}.<HF decoder-layer name>`."""
    out = {}
    for e, layer in layers.layers.items():
        for name, p in layer.state_dict().items():
            out[f"exits.{e}.{name}"] = p.detach().to(dtype).contiguous()
    return out


def load_exit_layers(layers: ExitLayers, directory: Path) -> dict[str, Any]:
    """Start `layers` from a balcony checkpoint's exit layers (e.g. the committed default),
    returning its soft.json `training` record (whose curve and CPU-hours a run continues).
    An exit the checkpoint lacks keeps its --exit-init copy (a new exit joins the run).
    Raises ValueError naming what does not fit, or when the checkpoint has none of them."""
    from models.checkpoint import EXIT_LAYERS, read_soft_json, read_tensors

    directory = Path(directory)
    path = directory / EXIT_LAYERS
    if not path.is_file():
        raise ValueError(f"--init-from {directory}: no {EXIT_LAYERS} (a balcony checkpoint?)")
    tensors = read_tensors(path)
    have = sorted({int(k.split(".")[1]) for k in tensors})
    if not set(have) & {int(e) for e in layers.layers}:
        raise ValueError(f"--init-from {directory}: none of the exits {list(layers.exits)} "
                         f"(it has {have})")  # fmt: skip
    for e, layer in layers.layers.items():
        prefix = f"exits.{e}."
        sd = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:  # a new exit: it keeps its --exit-init copy
            continue
        try:
            layer.load_state_dict(sd)
        except RuntimeError as err:
            raise ValueError(f"--init-from {directory}: exit {e} does not fit: {err}") from err
    soft = read_soft_json(directory, None)
    return dict(soft.training or {}) if soft else {}


# -- held-out cross-entropy during training --------------------------------------------


@dataclass
class HeldOut:
    """A held-out set's cache and its response targets: CE per exit without the base."""

    cache: ShardedCache
    examples: list[Example]

    def targets(self, seqs: Sequence[int]) -> Tensor:
        """(N,) the next token at every real position of `seqs` (IGNORE off the response)."""
        rows = []
        for s in seqs:
            labels = list(self.examples[s].labels)
            rows.append(torch.tensor(labels[1:] + [IGNORE]))
        return torch.cat(rows)


@torch.no_grad()
def heldout_ce(layers: ExitLayers, held: HeldOut, batch: int = 8) -> dict[int, float]:
    """Response CE per exit (and at full depth, key = the base's depth) on `held`."""
    sums: dict[int, float] = {}
    count = 0
    was_training = layers.training
    layers.eval()
    for lo in range(0, held.cache.num_sequences, batch):
        seqs = list(range(lo, min(lo + batch, held.cache.num_sequences)))
        b = read_batch(held.cache, seqs, 1.0)
        tgt = held.targets(seqs)
        sel = tgt != IGNORE
        count += int(sel.sum())
        outs = {**layers.normed(b), -1: b.final}
        for e, x in outs.items():
            logits = F.linear(x[sel], layers.head_weight).float()
            sums[e] = sums.get(e, 0.0) + float(F.cross_entropy(logits, tgt[sel], reduction="sum"))
    layers.train(was_training)
    return {e: v / max(count, 1) for e, v in sums.items()}


@dataclass
class Curve:
    """Held-out CE per exit against the CPU time spent on the run (teacher and training),
    across sessions: `offset_s` is what earlier runs spent, `points` every measurement."""

    offset_s: float = 0.0
    points: list[dict[str, Any]] = field(default_factory=list)

    def cpu_s(self) -> float:
        return self.offset_s + time.process_time()

    def add(self, step: int, tokens: int, ce: dict[int, float], load: float) -> dict[str, Any]:
        point = {"cpu_hours": round(self.cpu_s() / 3600, 4), "step": step,
                 "train_tokens": tokens, "load": round(load, 2),
                 "ce": {str(e): round(v, 4) for e, v in ce.items() if e >= 0},
                 "base_ce": round(ce[-1], 4) if -1 in ce else None}  # fmt: skip
        self.points.append(point)
        return point


def plot_curve(points: list[dict[str, Any]], path: Path, base_ce: float | None = None) -> None:
    """Held-out CE per exit against CPU-hours (log CE: the first point, an untrained
    layer, is ~10x the rest), the base's full depth and the targets' multiples as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    exits = sorted({int(e) for p in points for e in p["ce"]})
    for e in exits:
        xs = [p["cpu_hours"] for p in points if str(e) in p["ce"]]
        ys = [p["ce"][str(e)] for p in points if str(e) in p["ce"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"exit {e}")
    if base_ce is not None:
        ax.axhline(base_ce, color="k", ls="--", lw=1, label="base, full depth")
        for f, style in ((1.5, ":"), (1.15, "-.")):
            ax.axhline(base_ce * f, color="grey", ls=style, lw=0.8, label=f"{f}x base")
    ax.set_yscale("log")
    ax.set_xlabel("CPU-hours (teacher cache + training, all threads)")
    ax.set_ylabel("held-out response CE (nats/token)")
    ax.set_title("Exit layers: held-out CE vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the training run -------------------------------------------------------------------


def machine_load() -> float:
    import os

    return os.getloadavg()[0]


@dataclass(frozen=True)
class Caches:
    """What a run trains and measures on: the teacher cache of its data, the held-out
    cache (None without --eval-data), and what building them cost."""

    train: ShardedCache
    held: HeldOut | None
    build_s: float  # wall seconds this process spent on the training cache
    reused_cpu_s: float  # CPU seconds earlier processes spent on shards reused here, uncounted
    held_cpu_s: float  # CPU seconds this process spent on the held-out cache
    counted: tuple[str, ...] = ()  # every shard whose build the run's CPU-hours now count


def prepare_caches(args: Any, parser: Any, causal_lm: Any, tokenizer: Any,
                   cached: list[int], data: Any, before: dict[str, Any] | None = None
                   ) -> Caches:  # fmt: skip
    """Build (or reuse) the teacher cache of `data` and of --eval-data. `before`: the
    --init-from checkpoint's training record, whose CPU-hours count its own shards."""
    from models.loader import cache_dir
    from models.training.data import load_mixture

    root = Path(args.cache_dir) if args.cache_dir else cache_dir() / "teacher"
    t, cpu = time.time(), time.process_time()
    cache = build_cache(causal_lm, data.examples, cached, args.teacher_k, root,
                        progress=not args.no_progress)  # fmt: skip
    t, cpu = time.time() - t, time.process_time() - cpu
    held, held_cpu = None, time.process_time()
    if args.eval_data:
        try:
            ev = load_mixture(args.eval_data, tokenizer, args.eval_max_length)
        except ValueError as err:
            parser.error(f"--eval-data: {err}")
        held = HeldOut(build_cache(causal_lm, ev.examples, cached, 1, root,
                                   progress=not args.no_progress), ev.examples)  # fmt: skip
    # shards built by an earlier process count what their build spent, unless the record
    # this run continues counted them already; this process's own CPU time counts by itself
    counted = cache.counted_before(before)
    every = counted | {s.directory.name for s in cache.shards}
    return Caches(cache, held, t, cache.reused_cpu_s(counted), time.process_time() - held_cpu,
                  tuple(sorted(every)))  # fmt: skip


def cache_exits(args: Any, parser: Any, trained: list[int]) -> list[int]:
    """--cache-exits (default: the trained exits; soft-train parsed it into a list),
    checked: every trained exit needs a cached depth at or below it (exit 2 with a message
    otherwise)."""
    cached = list(args.cache_exits or trained)
    if sorted(set(cached)) != cached or cached[0] < 1 or cached[-1] > trained[-1]:
        parser.error(f"--cache-exits must be ascending distinct depths in 1..{trained[-1]}, "
                     f"got {cached}")  # fmt: skip
    low = [e for e in trained if e < cached[0]]
    if low:
        parser.error(f"--cache-exits {cached}: exits {low} lie below every cached depth")
    return cached


def train_balcony(args: Any, parser: Any, causal_lm: Any, tokenizer: Any, base_name: str,
                  exits: list[int], data: Any) -> Any:  # fmt: skip
    """`soft-train --method balcony`: build (or reuse) the teacher cache, then train one
    exit layer per exit below full depth on it. Returns a TrainResult."""
    from models.training.resume import TrainResult, final_loss, start

    num_layers = causal_lm.config.num_hidden_layers
    trained = [e for e in exits if e < num_layers]
    if not trained:
        parser.error("--method balcony needs at least one exit below full depth")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    causal_lm.requires_grad_(False).eval().to(device)
    cached = cache_exits(args, parser, trained)
    layers = ExitLayers(causal_lm, trained, args.exit_init)
    curve = Curve()
    before: dict[str, Any] | None = None
    if args.init_from:
        try:
            record = load_exit_layers(layers, Path(args.init_from))
        except ValueError as err:
            parser.error(str(err))  # exits 2
            raise
        before = record
        curve.offset_s = float(before.get("cpu_hours", 0.0)) * 3600
        curve.points = list(before.get("curve", []))
    caches = prepare_caches(args, parser, causal_lm, tokenizer, cached, data, before)
    curve.offset_s -= caches.held_cpu_s  # the held-out cache is measuring, not training
    layers.train()
    args.out.mkdir(parents=True, exist_ok=True)
    opt, sched, step, history, commands = start(args, parser, layers)
    # the --init-from record's commands first: the checkpoint says every run that made it
    earlier = list((before or {}).get("commands", []))
    commands[:0] = [c for c in earlier if c not in commands]
    run = BalconyRun(args, layers, caches, curve, opt, sched, history, commands, data,
                     exits, base_name, tokenizer, device)  # fmt: skip
    run.resume_state(step)
    run.train(step)
    final = {e: final_loss(history, e) for e in trained}
    return TrainResult(args.out, run.step, tuple(exits), final)


class BalconyRun:
    """The training loop of `train_balcony` and what it writes: the resumable state every
    --save-every steps (with the checkpoint), the held-out curve every --eval-every
    CPU-minutes."""

    def __init__(self, args: Any, layers: ExitLayers, caches: Caches, curve: Curve, opt: Any,
                 sched: Any, history: list[dict[str, float]], commands: list[str], data: Any,
                 exits: list[int], base_name: str, tokenizer: Any,
                 device: torch.device) -> None:  # fmt: skip
        self.args, self.layers, self.caches, self.curve = args, layers, caches, curve
        self.opt, self.sched, self.history, self.commands = opt, sched, history, commands
        self.data, self.exits, self.base_name, self.tokenizer = data, exits, base_name, tokenizer
        self.device = device
        self.trained = list(layers.exits)
        self.out: Path = args.out
        self.step = 0
        self.tokens_seen = 0  # over the whole run, resumes included
        self.new_tokens = 0  # by this process
        self.t0 = time.time()
        self.first_step = 0
        self.exact = None  # the head's always-exact columns: the data's most frequent tokens
        if args.head == "sampled":
            vocab = layers.head_weight.shape[0]
            counts = caches.train.token_counts(vocab)
            top = np.argsort(-counts, kind="stable")[: args.head_exact]
            self.exact = torch.from_numpy(top.copy())

    @property
    def state_file(self) -> Path:
        return self.out / "resume" / "balcony.json"

    def resume_state(self, step: int) -> None:
        """The run's own curve, CPU time and tokens when --resume found a state."""
        self.step = self.first_step = step
        if step and self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            self.curve.offset_s, self.curve.points = saved["cpu_s"], saved["curve"]
            self.tokens_seen = int(saved.get("tokens", 0))
        else:
            self.curve.offset_s += self.caches.reused_cpu_s

    def train(self, step: int) -> None:
        from tqdm import tqdm

        from models.training.data import step_batches

        args, cache = self.args, self.caches.train
        params = [p for p in self.layers.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(args.seed + step)
        position = {id(e): s for s, e in enumerate(self.data.examples)}  # -> cache sequence
        bar = tqdm(total=args.steps, initial=step, desc="balcony", dynamic_ncols=True,
                   disable=args.no_progress)  # fmt: skip
        if step == 0 and not self.curve.points:
            self.record()
        self.t0 = time.time()
        next_eval = self.curve.cpu_s() + args.eval_every * 60
        while self.step < args.steps:
            micro = step_batches(self.data.examples, self.step, args.batch_size,
                                 args.grad_accum, seed=args.seed)  # fmt: skip
            n_tok = sum(len(e.input_ids) for mb in micro for e in mb)
            sums = dict.fromkeys(self.trained, 0.0)
            for mb in micro:
                batch = read_batch(cache, [position[id(e)] for e in mb], float(n_tok),
                                   self.device)  # fmt: skip
                loss, per_exit = self.layers(batch, self.exact, args.head_samples, gen)
                loss.backward()
                for e, v in per_exit.items():
                    sums[e] += v
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += n_tok
            self.new_tokens += n_tok
            self.history.append({str(e): sums[e] / n_tok for e in self.trained})
            bar.update(1)
            rate = self.new_tokens / max(time.time() - self.t0, 1e-9)
            bar.set_postfix_str(" ".join(f"{e}:{sums[e] / n_tok:.2f}" for e in self.trained)
                                + f" {rate:.0f} tok/s")  # fmt: skip
            if self.curve.cpu_s() >= next_eval or self.step == args.steps:
                self.record(tqdm.write)
                next_eval = self.curve.cpu_s() + args.eval_every * 60
            if args.save_every and (self.step % args.save_every == 0 or self.step == args.steps):
                self.save()
        bar.close()
        if self.step == self.first_step:
            self.write_checkpoint()

    def record(self, say: Any = print) -> None:
        """Held-out CE per exit now, added to the curve (its time not counted)."""
        held = self.caches.held
        if held is None:
            return
        spent = time.process_time()
        ce = heldout_ce(self.layers, held)
        self.curve.offset_s -= time.process_time() - spent  # measuring is not training
        point = self.curve.add(self.step, self.tokens_seen, ce, machine_load())
        (self.out / CURVE).write_text(json.dumps(self.curve.points, indent=1))
        plot_curve(self.curve.points, self.out / "curve.png", point["base_ce"])
        say(f"held-out CE at {point['cpu_hours']:.3f} CPU-h, step {self.step}: "
            + " ".join(f"{e}:{v:.3f}" for e, v in point["ce"].items())
            + f" (base {point['base_ce']})")  # fmt: skip

    def save(self) -> None:
        from models.training.resume import save_resume

        save_resume(self.out, self.layers, self.opt, self.sched, self.step, self.history,
                    self.commands)  # fmt: skip
        state = {"cpu_s": self.curve.cpu_s(), "tokens": self.tokens_seen,
                 "curve": self.curve.points}  # fmt: skip
        self.state_file.write_text(json.dumps(state))
        self.write_checkpoint()

    def write_checkpoint(self) -> None:
        from models.training.resume import final_loss

        args, elapsed = self.args, time.time() - self.t0
        final = {e: final_loss(self.history, e) for e in self.trained}
        hidden = self.layers.head_weight.shape[1]
        training = {
            "method": "balcony", "exits": self.exits, "base_model": self.base_name,
            "data": [str(d) for d in args.data], "data_sha256": self.data.sha256,
            "examples": len(self.data.examples), "tokens": self.caches.train.num_tokens,
            "bad_records": len(self.data.bad), "command": args.command,
            "commands": self.commands, "steps": self.step, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "lr": args.lr, "max_length": args.max_length,
            "teacher_k": args.teacher_k, "head": args.head, "head_exact": args.head_exact,
            "head_samples": args.head_samples, "exit_init": args.exit_init,
            "teacher_cache_seconds": round(self.caches.build_s, 1),
            "teacher_shards": list(self.caches.counted),
            "cache_exits": list(self.caches.train.exits),
            "cache_bytes_per_token": bytes_per_token(hidden, len(self.caches.train.exits),
                                                     args.teacher_k),  # fmt: skip
            "seconds_per_step": round(elapsed / max(self.step - self.first_step, 1), 3),
            "train_tokens_per_second": round(self.new_tokens / max(elapsed, 1e-9), 1),
            "train_tokens": self.tokens_seen, "cpu_hours": round(self.curve.cpu_s() / 3600, 4),
            "curve": self.curve.points,
            "final_kl": {str(e): round(v, 4) for e, v in final.items()},
        }  # fmt: skip
        save_checkpoint(self.out, self.layers, self.tokenizer, self.exits, self.base_name,
                        training)  # fmt: skip


def save_checkpoint(out: Path, layers: ExitLayers, tokenizer: Any, exits: Sequence[int],
                    base_name: str, training: dict[str, Any]) -> None:  # fmt: skip
    """A balcony checkpoint: fp16 exit layers, the tokenizer and soft.json (with the run's
    record: its commands, curve and CPU-hours), written whole or not at all."""
    from safetensors.torch import save_file

    from models.checkpoint import EXIT_LAYERS, SoftConfig, write_soft_json

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (EXIT_LAYERS + ".tmp")
    save_file({k: v.cpu() for k, v in exit_layer_tensors(layers, torch.float16).items()},
              str(tmp))  # fmt: skip
    tmp.replace(out / EXIT_LAYERS)
    tokenizer.save_pretrained(str(out))
    write_soft_json(out, SoftConfig(method="balcony", exits=tuple(exits), base_model=base_name,
                                    training=training))  # fmt: skip
