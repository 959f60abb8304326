"""The app: its lifespan (the model loaded once, in the background, so /health can answer
503 meanwhile; a graceful drain at shutdown) and the wiring of model, engine, profile,
policy and metrics into the serving object (`load_serving`). Routes are in routes.py,
dependencies in deps.py, the error mapping and body limit in errors.py.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import TYPE_CHECKING

from fastapi import FastAPI

from server.http.deps import AppState
from server.http.errors import BodyLimit, add_error_handlers
from server.http.openapi import describe
from server.http.playground import page
from server.http.routes import router, v1
from server.metrics import Metrics
from server.policy.governor import GovernorConfig
from server.policy.latency import LatencyProfile, read_profile_file
from server.policy.policies import make_policy
from server.serving.generation import ServingOptions
from server.serving.openai import OpenAIServing
from server.settings import Settings

if TYPE_CHECKING:
    from models.llama import SortedModel
    from server.engine.core import Engine

log = logging.getLogger("soft_serve")

try:
    VERSION = importlib.metadata.version("soft-serve")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+local"


def load_serving(settings: Settings) -> OpenAIServing:
    """Load the model, its latency profile, the policy, the engine: everything a request
    needs. Runs once, in a worker thread, during the lifespan."""
    from server.engine.core import on_own_thread

    t0 = time.monotonic()
    # torch work on a thread that ends, so the engine's step thread is the only one with
    # an OpenMP team (server/engine/core.py says why)
    model, engine = on_own_thread(lambda: build_engine(settings))
    exits = tuple(model.exits)
    default = settings.default_depth or exits[-1]
    if default not in exits:
        raise ValueError(f"--default-depth {default} is not an exit of the model {list(exits)}")
    profile = load_profile(settings, model, engine, exits)
    governor = GovernorConfig(
        **{f.name: getattr(settings, f"governor_{f.name}") for f in fields(GovernorConfig)}
    )
    policy = make_policy(settings.policy, exits, default, profile, stats=engine.stats,
                         max_num_seqs=settings.max_num_seqs, governor=governor)  # fmt: skip
    serving = OpenAIServing(
        model, engine, policy, Metrics(exits), settings.model_name(), serving_options(settings)
    )
    log.info(
        "loaded %s (L=%d, exits=%s, method=%s, profile from %s) in %.1fs",
        settings.model,
        model.num_layers,
        list(exits),
        model.method,
        profile.source,
        time.monotonic() - t0,
    )
    return serving


def serving_options(settings: Settings) -> ServingOptions:
    return ServingOptions(
        max_n=settings.max_n,
        max_queue=settings.max_queue,
        trust_request_chat_template=settings.trust_request_chat_template,
        text_timeout_s=settings.text_timeout,
        grammar_timeout_s=settings.grammar_timeout,
        output_tokens_prior=settings.output_tokens_prior,
    )


def build_engine(settings: Settings) -> tuple[SortedModel, Engine]:
    """The model and its engine (on the caller's thread: see load_serving)."""
    import models
    from server.engine.core import Engine, EngineConfig
    from server.engine.speculative import SpecConfig

    model = models.load(settings.model, device=settings.device, dtype=settings.dtype,
                        quantization=settings.quantization)  # fmt: skip
    if model.tokenizer is None:
        raise ValueError(f"{settings.model}: no tokenizer files; the server needs a tokenizer")
    speculative = SpecConfig(
        mode=settings.speculative,
        exit=settings.speculative_exit,
        k=settings.speculative_k,
        draft_vocab=settings.speculative_vocab,
    )
    config = EngineConfig(
        block_size=settings.block_size,
        kv_cache_memory=int(settings.kv_cache_memory),
        max_num_seqs=settings.max_num_seqs,
        max_queue=settings.max_queue,
        max_model_len=settings.max_model_len,
        speculative=speculative,
        prefix_cache=settings.prefix_cache,
        kv_cache_dtype=settings.kv_cache_dtype,
    )
    return model, Engine(model, config)


def load_profile(
    settings: Settings, model: SortedModel, engine: Engine, exits: tuple[int, ...]
) -> LatencyProfile:
    """--latency-profile FILE, else soft.json's, else measured through the engine itself
    before any request (which starts it)."""
    from server.profile import startup_profile

    if settings.latency_profile:  # soft-profile --out, for a checkpoint one cannot write to
        return read_profile_file(settings.latency_profile, exits)
    if model.soft.latency_profile:
        return LatencyProfile.from_json(model.soft.latency_profile, exits)
    engine.start()
    return startup_profile(engine, exits, seconds=settings.profile_seconds)


def create_app(
    settings: Settings,
    loader: Callable[[Settings], OpenAIServing] = load_serving,
    on_load_error: Callable[[], None] | None = None,
) -> FastAPI:
    """The soft-serve ASGI app. `loader` builds the serving object (tests pass a fake
    engine through it); `on_load_error` is told when loading fails (the CLI exits)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = app.state.soft

        async def load() -> None:
            try:
                serving = await asyncio.to_thread(loader, settings)
                serving.engine.start()
                serving.metrics.carry_rejections(state.metrics)
                state.serving = serving
            except Exception as e:
                if isinstance(e, (FileNotFoundError, ValueError)):  # the user's to fix
                    log.error("cannot serve %s: %s", settings.model, e)
                else:
                    log.exception("failed to load the model")
                state.error = f"{type(e).__name__}: {e}"
                if on_load_error is not None:
                    on_load_error()

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            state.draining = True
            if not task.done():
                await asyncio.wait([task], timeout=settings.drain_timeout)
            if state.serving is not None:
                await state.serving.engine.shutdown(settings.drain_timeout)
                state.serving.text.shutdown()
                state.serving.grammars.shutdown()

    app = FastAPI(title="soft-serve", version=VERSION, lifespan=lifespan)
    app.state.soft = AppState(settings, VERSION)
    app.include_router(router)
    app.include_router(v1)
    app.include_router(page)  # the playground at /
    add_error_handlers(app)
    app.openapi = describe(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_bytes))
    return app
