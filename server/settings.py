"""Deployment settings of `soft-serve`: flags (server/cli.py) or `SOFT_*` environment
variables, flags winning. Model and engine internals stay in frozen dataclasses; this is
only what an operator sets."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.quantization import Quantization

PolicyName = Literal["fixed", "budget", "load"]


class Settings(BaseSettings):
    """Every option of `soft-serve`; each field is a `--flag` and a `SOFT_<NAME>` variable."""

    model_config = SettingsConfigDict(env_prefix="SOFT_", extra="ignore", frozen=True)

    model: str = Field(
        "default",
        description="model to serve: 'default' (embedded SmolLM2-135M-Instruct), a "
        "Hugging Face / SoFT checkpoint directory, or a .gguf file",
    )
    served_model_name: str | None = Field(
        None,
        description="name clients use in 'model'; default: the checkpoint directory's "
        "basename, or 'default'",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    policy: PolicyName = Field(
        "budget",
        description="depth policy: 'fixed' (always --default-depth unless pinned), 'budget' "
        "(deepest exit whose predicted latency under the current load fits x-latency-budget "
        "/ x-slo-*), 'load' (budget + a governor that caps the depth of requests without a "
        "budget as the queue and time per token grow, and bounds the exits budgets pick "
        "while it does; see --governor-*)",
    )
    default_depth: int | None = Field(
        None,
        ge=1,
        description="depth for requests without a budget or pin; default: the deepest exit",
    )
    api_key: SecretStr | None = Field(
        None, description="if set, /v1/* requires 'Authorization: Bearer <key>'"
    )
    device: str | None = Field(None, description="torch device; default: cuda if present")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="weights dtype; default: bfloat16 on CUDA, float32 on CPU"
    )
    quantization: Quantization = Field(
        Quantization.AUTO,
        description="weights' format (of the layer matrices and head; CPU only but none): "
        "auto (int8 on a CPU where soft-serve's kernels build, the fastest setting there at a "
        "held-out CE within 0.2 percent of fp32, docs/performance.md; none elsewhere, e.g. CUDA), "
        "int8 per channel, int4 in groups of 32 (from a Q4_0/Q4_1 GGUF's own blocks when no "
        "delta is merged; the head stays int8), bf16 (fp32 activations, soft-serve's kernels "
        "only), none (the checkpoint's float weights); on soft-serve's kernels int8/int4 "
        "multiply int8 activations like llama.cpp's Q8_0 over few rows, and over many rows "
        "(as bf16 does past one) fp32 ones, or bf16 ones on a CPU with AVX-512 BF16",
    )
    kv_cache_memory: ByteSize = Field(
        ByteSize(1 << 30), description="bytes for KV-cache blocks, e.g. 2GiB or 512MiB"
    )
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="KV-cache element type: auto is float16 where soft-serve's CPU kernels "
        "attend (half the bytes a decode step reads from the cache and twice the tokens "
        "--kv-cache-memory holds; llama.cpp's default too), the model's dtype elsewhere; "
        "float32 keeps the attention's inputs exact",
    )
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    max_num_seqs: int = Field(32, ge=1, description="sequences per decode batch")
    prefix_cache: bool = Field(
        True,
        description="reuse the KV of prompt prefixes computed before (full blocks, by "
        "content): a request at depth d reuses what any request at depth >= d computed for "
        "the same leading tokens; usage.prompt_tokens_details.cached_tokens says how many. "
        "--no-prefix-cache recomputes every prompt (vLLM's --no-enable-prefix-caching)",
    )
    max_queue: int = Field(256, ge=1, description="waiting sequences before new requests get 429")
    max_model_len: int | None = Field(
        None, ge=2, description="context window served (prompt + max_tokens); default: the "
        "model's own",
    )  # fmt: skip
    max_n: int = Field(16, ge=1, description="largest 'n' (choices per prompt) accepted")
    max_body_bytes: ByteSize = Field(
        ByteSize(8 << 20), description="largest request body accepted (else 413)"
    )
    trust_request_chat_template: bool = Field(
        False,
        description="render a chat template a request brings (chat_template, or "
        "chat_template_kwargs.chat_template; vLLM's flag); off: such requests get 400. Only "
        "for clients you trust: a template is code, bounded by --text-timeout",
    )
    text_timeout: float = Field(
        5.0,
        gt=0,
        description="seconds one request's chat templating and tokenisation may take (on "
        "worker threads, never the event loop); over it: 400",
    )
    grammar_timeout: float = Field(
        5.0,
        gt=0,
        description="seconds compiling one request's structured-output schema, regex or "
        "grammar may take (on worker threads, never the event loop); over it: 400",
    )
    output_tokens_prior: int = Field(
        256,
        ge=1,
        description="output tokens the policy expects of a chat request without max_tokens "
        "until finished ones say otherwise (then the 75th percentile of the last 256)",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds SIGTERM waits for in-flight requests before exiting"
    )
    speculative: Literal["auto", "off"] = Field(
        "off",
        description="self-speculative decoding for small decode batches: draft with a shallow "
        "exit, verify with the request's own depth (greedy output unchanged, sampling keeps "
        "its distribution); 'auto' picks the exit and k from measured acceptance rates",
    )
    speculative_exit: int | None = Field(
        None, ge=1, description="draft exit for --speculative auto; default: chosen online"
    )
    speculative_k: int | None = Field(
        None, ge=1, le=16, description="draft tokens per verify step; default: chosen online"
    )
    speculative_vocab: int = Field(
        8192,
        ge=0,
        description="drafts choose among the first N token ids (a cheaper draft head; "
        "verification uses the full head); 0 = the whole vocabulary",
    )
    profile_seconds: float = Field(
        3.0,
        ge=0,
        description="time budget of the start-up latency profile, used when "
        "soft.json has no latency_profile",
    )
    latency_profile: str | None = Field(
        None,
        description="JSON file with a latency profile (soft-profile --out, or a soft.json); "
        "wins over the checkpoint's own soft.json and the start-up measurement",
    )
    governor_queue_high: int = Field(
        4, ge=1, description="--policy load: waiting sequences that count as overload"
    )
    governor_queue_low: int = Field(
        0, ge=0, description="--policy load: the cap is raised only while at most this many wait"
    )
    governor_tpot_ms: float | None = Field(
        None,
        gt=0,
        description="--policy load: time per output token of running requests (decode step "
        "plus newcomers' prefills) that counts as overload; default: 2x the default depth's "
        "one-row step in the latency profile",
    )
    governor_restore_ratio: float = Field(
        0.7,
        gt=0,
        le=1,
        description="--policy load: raise the cap only if one exit deeper is predicted at "
        "most this x --governor-tpot-ms",
    )
    governor_factor: float = Field(
        0.7, gt=0, lt=1, description="--policy load: each lowering keeps ~this share of layers"
    )
    governor_down_s: float = Field(
        0.5, ge=0, description="--policy load: seconds overload must last to lower the cap"
    )
    governor_up_s: float = Field(
        5.0, ge=0, description="--policy load: seconds without overload to raise it one exit"
    )
    governor_max_utilization: float = Field(
        0.8,
        gt=0,
        description="--policy load: raise the cap only while the recent arrivals, served one "
        "exit deeper, are predicted to need at most this share of the engine's time (1 or "
        "more: no such check)",
    )
    governor_min_depth: int | None = Field(
        None, ge=1, description="--policy load: floor of the cap; default: the shallowest exit"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the server and uvicorn"
    )

    def model_name(self) -> str:
        """The name `/v1/models` lists and clients send."""
        if self.served_model_name:
            return self.served_model_name
        if self.model == "default":
            return "default"
        path = Path(self.model)
        return (path.stem if path.suffix == ".gguf" else path.name) or self.model
