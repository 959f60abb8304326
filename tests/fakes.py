"""Test doubles for the API layer: a tiny served checkpoint (random 4-layer LLaMA with a
byte-level BPE tokenizer and a ChatML template, built offline) and `FakeEngine`, which
speaks the engine's interface with scripted, deterministic tokens."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.types import EngineStats, GenerationRequest, QueueFull, TokenEvent, TokenLogprob

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (pad, bos, eos)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, how are you? I am fine, thank you. Say hi to the model.",
    "Sorted fine-tuning makes every prefix of the decoder a usable language model.",
    "Zürich, café, naïve, 東京, and emoji 🙂 are multi-byte characters.",
    "0123456789 + - * / = ( ) [ ] { } < > ! ? . , ; : ' \" @ # $ % ^ & _ ~",
]


def make_tokenizer(path: Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE on a few strings and save it (with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return fast


def make_served_checkpoint(
    path: Path,
    exits: tuple[int, ...] = (2, 4),
    profile: dict[str, Any] | None = None,
    context: int = 256,
) -> Path:
    """A servable tiny checkpoint: 4 layers, hidden 64, vocab 384 (the tokenizer's)."""
    from tests.conftest import make_hf_model, save_checkpoint

    model = make_hf_model(vocab_size=384, max_position_embeddings=context)
    soft: dict[str, Any] = {"format": "soft-checkpoint/1", "method": "soft", "exits": list(exits)}
    if profile is not None:
        soft["latency_profile"] = profile
    save_checkpoint(model, path, soft)
    make_tokenizer(path)
    return path


# a profile where depth 2 costs half of depth 4: budgets choose predictably
PROFILE = {
    "prefill_ms_per_token": {"2": 0.1, "4": 0.2},
    "decode_ms_per_step": {"2": 5.0, "4": 10.0},
}


@dataclass
class FakeEngine:
    """The engine's interface with scripted tokens: `script(request)` gives the ids a
    request generates (default: a deterministic function of prompt, seed and position).
    Blocks are counted like the real cache: depth x ceil(tokens / block_size)."""

    model: Any
    config: Any = None
    script: Callable[[GenerationRequest], list[int]] | None = None
    token_delay: float = 0.0
    max_queue: int = 256
    block_size: int = 16
    submitted: list[GenerationRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)  # request id -> blocks held
    cached_at_submit: dict[str, int] = field(default_factory=dict)  # request id -> tokens
    started: bool = False
    stopped: bool = False

    def __post_init__(self) -> None:
        self.max_model_len: int = self.model.cfg.max_position_embeddings
        self.eos = set(self.model.cfg.eos_token_ids)
        self._cancel: dict[str, asyncio.Event] = {}

    def start(self) -> None:
        self.started = True

    async def shutdown(self, drain_timeout: float) -> None:
        self.stopped = True

    def check(self, request: GenerationRequest) -> None:
        n, p = len(request.prompt_ids), request.params
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + p.max_tokens > self.max_model_len:
            raise ValueError(f"context window is {self.max_model_len} tokens")

    def tokens(self, request: GenerationRequest) -> list[int]:
        if self.script is not None:
            return self.script(request)
        base = sum(request.prompt_ids) * 31 + (request.params.seed or 0) * 17
        vocab = self.model.cfg.vocab_size
        return [3 + (base + 7 * k) % (vocab - 3) for k in range(request.params.max_tokens)]

    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.check(request)
        if len(self.active) >= self.max_queue:
            raise QueueFull(retry_after_s=2.0)
        cached = self.cached_tokens(request.prompt_ids, (request.depth,))[request.depth]
        self.cached_at_submit[request.request_id] = cached
        self.submitted.append(request)
        self.active[request.request_id] = request.depth * math.ceil(
            len(request.prompt_ids) / self.block_size
        )
        self._cancel[request.request_id] = asyncio.Event()
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rid, p = request.request_id, request.params
        ids = self.tokens(request)
        prompt_lp = None
        if p.prompt_logprobs is not None:
            prompt_lp = (None,) + tuple(
                TokenLogprob(
                    t, -1.0 - 0.01 * i, ((t, -1.0 - 0.01 * i), (0, -9.0))[: p.prompt_logprobs]
                )
                for i, t in enumerate(request.prompt_ids[1:])
            )
        try:
            for k, tok in enumerate(ids[: p.max_tokens]):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                if self._cancel[rid].is_set():
                    yield TokenEvent(rid, None, finish_reason="abort", depth=request.depth)
                    return
                finish = None
                if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
                    finish = "stop"
                elif k + 1 == p.max_tokens:
                    finish = "length"
                lp = None
                if p.logprobs is not None:
                    lp = TokenLogprob(tok, -0.5, ((tok, -0.5), (1, -2.0))[: p.logprobs])
                held = len(request.prompt_ids) + k + 1
                self.active[rid] = request.depth * math.ceil(held / self.block_size)
                yield TokenEvent(
                    rid,
                    tok,
                    lp,
                    finish,
                    request.depth,
                    prompt_logprobs=prompt_lp if k == 0 else None,
                    queue_seconds=0.001 if k == 0 else None,
                    cached_tokens=self.cached_at_submit.get(rid, 0) if k == 0 else None,
                )
                if finish:
                    return
            yield TokenEvent(rid, None, finish_reason="length", depth=request.depth)
        finally:
            self.active.pop(rid, None)

    def cached_tokens(self, prompt_ids: Sequence[int], depths: Sequence[int]) -> dict[int, int]:
        """Whole blocks this prompt shares with one submitted before (at least one token
        left to compute), at any depth: the real cache's answer for same-depth repeats."""
        best = 0
        for seen in self.submitted:
            n = 0
            limit = min(len(seen.prompt_ids), len(prompt_ids) - 1)
            while n < limit and seen.prompt_ids[n] == prompt_ids[n]:
                n += 1
            best = max(best, n // self.block_size * self.block_size)
        return dict.fromkeys(depths, best)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self._cancel:
            self._cancel[request_id].set()
        self.active.pop(request_id, None)

    def stats(self) -> EngineStats:
        layers = self.model.num_layers
        used = sum(self.active.values())
        return EngineStats(
            running=len(self.active),
            waiting=0,
            batch_size=len(self.active),
            kv_blocks_total=1024,
            kv_blocks_used=used,
            kv_bytes_per_layer=(used * 1024 // layers,) * layers,
            kv_bytes_total=used * 1024,
            decode_step_seconds=0.001,
            steps=0,
            preemptions=0,
        )
