"""Structured outputs: a request's JSON schema, regex, choice list or EBNF grammar compiled
into a grammar (xgrammar), and for each of its sequences a matcher that the engine masks
the logits with and advances past every token (server/engine/types.py's TokenConstraint).

Why xgrammar (vLLM's and SGLang's default) rather than llguidance, measured on SmolLM2's
49152-token vocabulary, one thread, on a loaded 2-core machine: the per-token mask takes
a median ~3 us (llguidance ~20 us, with spikes of several ms), which is what every
constrained decode step pays; compiling a schema takes ~7-33 ms (llguidance ~1-2 ms), which
the cache below pays once per schema. Both accepted and finished the same valid documents
and refused the same broken schemas.

Whitespace is compact (no free whitespace between JSON tokens): a shallow exit or a tiny
model cannot then spend its max_tokens on newlines inside an object. Objects are strict
(no properties beyond the schema's), as OpenAI's `strict: true` and vLLM by default.

Compilation is bounded, and off the event loop:
- size: MAX_SOURCE_CHARS of schema / regex / grammar text (a 20 KiB schema of 300 patterned
  strings took 13 s here): a 400 before any work;
- time: compiles run on a pool of their own (COMPILE_WORKERS threads; xgrammar releases the
  GIL, so /health and every stream keep answering); one past `timeout_s` is a 400 and is
  left to finish on its thread (xgrammar cannot be interrupted), remembered as refused so
  that sending it again costs nothing;
- cache: compiled grammars and refusals by their text, least recently used out first.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from server.serving.errors import APIError, bad_request
from server.serving.protocol import StructuredSpec

if TYPE_CHECKING:
    import xgrammar
    from torch import Tensor

MAX_SOURCE_CHARS = 16 * 1024  # a schema's JSON text, a regex, a grammar, the choices
COMPILE_WORKERS = 2  # compiles at once; more wait (within their deadline) for a thread
CACHE_SIZE = 256  # compiled grammars (and refusals) kept
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: "


class GrammarError(Exception):
    """A schema, regex or grammar that does not compile; the message says why."""


class Matcher:
    """One sequence's grammar state (the engine's TokenConstraint) over xgrammar's."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        import xgrammar

        self._m = xgrammar.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())


class Grammar:
    """A compiled constraint; `matcher()` starts a sequence's state over it."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.compiled = compiled

    def matcher(self) -> Matcher:
        return Matcher(self.compiled)


def choice_grammar(choices: Iterable[str]) -> str:
    """EBNF for exactly one of `choices` (JSON string literals are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# xgrammar 0.2.8 lets a length-bounded string (maxLength, minLength) hold raw control
# characters, which JSON forbids in a string (json.loads and the OpenAI SDK's parser refuse
# them); its unbounded strings exclude U+0000-U+001F as they should: the same class for both
_BOUNDED_CHARS = r"[^\"\\\r\n]"
_JSON_CHARS = r"[^\0-\x1f\"\\\r\n]"


def json_schema_ebnf(schema: str) -> str:
    """xgrammar's EBNF for a JSON schema (compact whitespace, strict objects), with every
    string character a JSON string allows unescaped."""
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    return str(grammar).replace(_BOUNDED_CHARS, _JSON_CHARS)


class Grammars:
    """Compiles requests' constraints for one tokenizer, bounded and cached."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        timeout_s: float = 5.0,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.timeout_s, self.cache_size = timeout_s, cache_size
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Grammar | str] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool: Any = None  # a ThreadPoolExecutor, made on first use

    # -- the event loop's side ---------------------------------------------------------------
    async def compile(self, spec: StructuredSpec) -> Grammar:
        """The grammar for `spec`, compiled on the pool (or from the cache).

        Raises:
            APIError: 400 naming `spec.param` when it is too large, does not compile, or
                takes longer than `timeout_s` to.
        """
        self._check_size(spec)
        key = (spec.kind, spec.source)
        hit = self._cached(key)
        if isinstance(hit, str):
            raise bad_request(hit, spec.param)
        if hit is not None:
            return hit
        started = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor(), self._compile_started, spec, started
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError as e:
            message = (
                f"compiling {spec.param} took over {self.timeout_s:g}s: simplify it (fewer "
                "properties, patterns or alternatives)"
            )
            if started.is_set():  # it ran that long itself (not waiting for a thread)
                self._remember(key, message)
            raise bad_request(message, spec.param) from e
        except GrammarError as e:
            raise bad_request(str(e), spec.param) from e

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- any thread --------------------------------------------------------------------------
    def compile_now(self, spec: StructuredSpec) -> Grammar:
        """The grammar for `spec` on this thread (cached; no deadline): tests, benchmarks.

        Raises:
            GrammarError: it is too large or does not compile.
        """
        try:
            self._check_size(spec)
        except APIError as e:
            raise GrammarError(e.message) from e
        key = (spec.kind, spec.source)
        hit = self._cached(key)
        if isinstance(hit, str):
            raise GrammarError(hit)
        return hit if hit is not None else self._compile(spec)

    def _check_size(self, spec: StructuredSpec) -> None:
        if len(spec.source) > MAX_SOURCE_CHARS:
            raise bad_request(
                f"{spec.param} is {len(spec.source)} characters; at most {MAX_SOURCE_CHARS} "
                "are compiled",
                spec.param,
            )

    def _cached(self, key: tuple[str, str]) -> Grammar | str | None:
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _remember(self, key: tuple[str, str], value: Grammar | str) -> None:
        with self._cache_lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="soft-grammar")
        return self._pool

    def _compile_started(self, spec: StructuredSpec, started: threading.Event) -> Grammar:
        started.set()
        return self._compile(spec)

    def _compile(self, spec: StructuredSpec) -> Grammar:
        """Compile (on a pool thread); the result, or the refusal, goes in the cache."""
        key = (spec.kind, spec.source)
        try:
            grammar = Grammar(self._compile_source(spec))
        except GrammarError as e:
            self._remember(key, str(e))
            raise
        self._remember(key, grammar)
        return grammar

    def _compile_source(self, spec: StructuredSpec) -> xgrammar.CompiledGrammar:
        compiler = self.compiler()
        what = {"json": "JSON schema", "regex": "regex", "choice": "choice",
                "grammar": "grammar (EBNF)"}[spec.kind]  # fmt: skip
        try:
            if spec.kind == "json":
                schema = json.loads(spec.source)
                if not isinstance(schema, dict):
                    raise GrammarError(f"{spec.param} must be a JSON schema object")
                return compiler.compile_grammar(json_schema_ebnf(spec.source))
            if spec.kind == "regex":
                return compiler.compile_regex(spec.source)
            if spec.kind == "choice":
                choices = json.loads(spec.source)
                if any(c == "" for c in choices):
                    raise GrammarError(f"{spec.param}: a choice must not be empty")
                return compiler.compile_grammar(choice_grammar(choices))
            return compiler.compile_grammar(spec.source)
        except GrammarError:
            raise
        except json.JSONDecodeError as e:
            raise GrammarError(f"{spec.param} is not valid JSON: {e}") from e
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with the reason
            reason = _LOCATION.sub("", str(e).strip()).splitlines()[0] if str(e).strip() else ""
            raise GrammarError(f"{spec.param}: this {what} does not compile: {reason}") from e

    def compiler(self) -> xgrammar.GrammarCompiler:
        """xgrammar's compiler over this tokenizer (built on first use: ~0.2 s for a 49k
        vocabulary). Its own cache is off: ours keys by the request's text."""
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self.stop_token_ids,
                )
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler
