"""OpenAI request and response shapes (as the OpenAI API and vLLM accept them).

Requests validate themselves (pydantic; the app maps every validation error to a 400) and
turn into engine `SamplingParams` with `to_sampling_params()`. Unknown fields are accepted
and ignored, as OpenAI clients send many; known fields the server cannot honour
(`best_of` > n, `suffix`, `tools`, two structured-output forms at once) are named by
`unsupported()` and refused with a 400 rather than ignored. Structured outputs come in
OpenAI's `response_format` (json_object, json_schema) or vLLM's `structured_outputs` /
older `guided_*` fields; `structured()` reads whichever the request sent as one
`StructuredSpec` (server/serving/structured.py compiles it). Every string a request carries
has its lone UTF-16 surrogates (a JavaScript client that cut a string inside an emoji)
replaced with U+FFFD before validation: the tokenizer and the JSON encoder refuse them.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from server.engine.types import SamplingParams

MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
_SURROGATE = re.compile("[\ud800-\udfff]")


def _whole(value: Any) -> Any:
    """1.0 is the integer 1 (JSON Schema's reading, which clients and fuzzers follow)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# int fields reject bools, strings and fractions (a JSON `true` is not a token count)
Int = Annotated[StrictInt, BeforeValidator(_whole)]
TokenId = Annotated[Int, Field(ge=0)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


def scrub(value: Any) -> Any:
    """`value` (parsed JSON) with every lone surrogate in its strings replaced by U+FFFD;
    a surrogate pair left split (some JSON decoders do) is joined back into its character."""
    if isinstance(value, str):
        if _SURROGATE.search(value) is None:
            return value
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    return value


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIRequest(OpenAIModel):
    """A request body: its strings are scrubbed of lone surrogates first."""

    @model_validator(mode="before")
    @classmethod
    def _scrub(cls, data: Any) -> Any:
        return scrub(data)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIModel):
    """OpenAI's response_format.json_schema (what the SDK's `parse()` sends)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # always strict here: no properties beyond the schema's


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: free text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format json_schema needs a json_schema object")
        return self


JsonSchemaField = dict[str, Any] | str  # a schema, or its JSON text (vLLM takes both)
Choices = Annotated[list[str], Field(min_length=1)]


class StructuredOutputs(OpenAIModel):
    """vLLM's structured_outputs extra body: one of json, regex, choice, grammar (EBNF),
    json_object."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: JsonSchemaField | None = Field(None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None
    json_object: bool | None = None


@dataclass(frozen=True)
class StructuredSpec:
    """One structured-output constraint as requested (before compiling)."""

    kind: Literal["json", "regex", "choice", "grammar"]
    source: str  # a JSON schema's text, a regex, the choices as a JSON list, EBNF
    param: str  # the field a 400 about it names

    @staticmethod
    def schema(value: JsonSchemaField | None, param: str) -> StructuredSpec:
        """A JSON schema (dict or text; None: any JSON object). Its text keeps the key
        order (the output's properties follow it)."""
        if value is None:
            return StructuredSpec("json", '{"type": "object"}', param)
        return StructuredSpec("json", value if isinstance(value, str) else json.dumps(value),
                              param)  # fmt: skip


class SamplingFields(OpenAIRequest):
    """Fields both endpoints share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1)  # vLLM: -1 or 0 = off
    n: Int = Field(1, ge=1)
    stop: Stop = None
    seed: Int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's penalties (subtracted from the logits of tokens already generated: once
    # per occurrence, and once if present at all) and biases (added, by token id)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: (
        Annotated[
            dict[str, float],
            WithJsonSchema(
                {
                    "type": "object",
                    "maxProperties": MAX_LOGIT_BIAS,
                    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                }
            ),
        ]
        | None
    ) = Field(None, max_length=MAX_LOGIT_BIAS)
    # accepted only where they change nothing (see unsupported())
    best_of: Int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None  # structured outputs (OpenAI)
    # structured outputs, vLLM's names (the guided_* are its older ones)
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaField | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None
    # vLLM extensions
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)  # >1 discourages repeats

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids (whole numbers), not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], not {bias}")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first field this server cannot honour, else None."""
        if self.best_of is not None and self.best_of > self.n:
            return "best_of", "best_of > n is not supported: send n only"
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", "best_of must be at least n"
        forms = self.structured_forms()
        if len(forms) > 1:
            return forms[1].param, (
                f"{forms[0].param} and {forms[1].param} both constrain the output; two "
                "constraints at once are not supported: send one"
            )
        return None

    def structured_forms(self) -> list[StructuredSpec]:
        """Every structured-output constraint the request sent (at most one is valid)."""
        out: list[StructuredSpec] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            out.append(StructuredSpec.schema(None, "response_format"))
        elif rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            out.append(StructuredSpec.schema(rf.json_schema.schema_,
                                             "response_format.json_schema.schema"))  # fmt: skip
        so = self.structured_outputs
        if so is not None:
            if so.json_ is not None:
                out.append(StructuredSpec.schema(so.json_, "structured_outputs.json"))
            if so.regex is not None:
                out.append(StructuredSpec("regex", so.regex, "structured_outputs.regex"))
            if so.choice is not None:
                out.append(StructuredSpec("choice", json.dumps(so.choice),
                                          "structured_outputs.choice"))  # fmt: skip
            if so.grammar is not None:
                out.append(StructuredSpec("grammar", so.grammar, "structured_outputs.grammar"))
            if so.json_object:
                out.append(StructuredSpec.schema(None, "structured_outputs.json_object"))
        if self.guided_json is not None:
            out.append(StructuredSpec.schema(self.guided_json, "guided_json"))
        if self.guided_regex is not None:
            out.append(StructuredSpec("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            out.append(StructuredSpec("choice", json.dumps(self.guided_choice), "guided_choice"))
        if self.guided_grammar is not None:
            out.append(StructuredSpec("grammar", self.guided_grammar, "guided_grammar"))
        return out

    def structured(self) -> StructuredSpec | None:
        """The request's structured-output constraint, if any."""
        forms = self.structured_forms()
        return forms[0] if forms else None

    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: Stop) -> Stop:
        stops = [v] if isinstance(v, str) else v or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=None if self.seed is None else self.seed % 2**63,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=self.logit_bias_ids(),
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
        )


# "" is refused after tokenizing ("the prompt is empty", as are prompts that tokenize to
# nothing); the document says so up front
PromptText = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]
Prompt = (
    PromptText
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[PromptText], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: Int = Field(16, ge=0)  # 0: only with echo (prompt logprobs)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None  # insertion: not supported (unsupported())

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (text insertion) is not supported"
        return super().unsupported()

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch of prompts: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]

    def to_sampling_params(self, max_tokens: int | None = None) -> SamplingParams:
        lp = self.logprobs
        return self._params(
            max_tokens or self.max_tokens, lp, lp if (self.echo and lp is not None) else None
        )


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM extension
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension
    # vLLM extension: a Jinja template of the client's own; refused unless the server was
    # started with --trust-request-chat-template (so is chat_template_kwargs.chat_template)
    chat_template: str | None = None
    tools: list[Any] | None = None  # tool calling: not supported (unsupported())
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None  # the legacy names of tools / tool_choice
    function_call: str | dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, f"{name} (tool calling) is not supported"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"{name} (tool calling) is not supported"
        return super().unsupported()

    def request_template(self) -> str | None:
        """The chat template the request brings, if any (field or chat_template_kwargs)."""
        kwargs = self.chat_template_kwargs or {}
        template = kwargs.get("chat_template", self.chat_template)
        return None if template is None else str(template)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, None)


# -- responses -------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class SoftInfo(BaseModel):
    """Which exit served the request and what the policy predicted."""

    depth: int
    budget_ms: float | None
    predicted_ms: float


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs (what lm-evaluation-harness reads)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    soft: SoftInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    soft: SoftInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "soft-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    depth: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
