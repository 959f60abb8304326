"""Request models: what they accept, what they refuse, what the engine gets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.engine.types import SamplingParams
from server.serving.protocol import ChatCompletionRequest, CompletionRequest


def test_completion_to_sampling_params() -> None:
    req = CompletionRequest.model_validate(
        {"prompt": "hi", "max_tokens": 7, "temperature": 0, "top_p": 0.9, "top_k": -1,
         "seed": 3, "logprobs": 2, "stop_token_ids": [5], "ignore_eos": True}
    )  # fmt: skip
    assert req.to_sampling_params() == SamplingParams(
        max_tokens=7, temperature=0.0, top_p=0.9, top_k=0, seed=3, stop_token_ids=(5,),
        ignore_eos=True, logprobs=2, prompt_logprobs=None,
    )  # fmt: skip
    echo = CompletionRequest.model_validate({"prompt": [1, 2], "echo": True, "logprobs": 1})
    p = echo.to_sampling_params(max_tokens=1)
    assert p.max_tokens == 1 and p.logprobs == 1 and p.prompt_logprobs == 1
    assert CompletionRequest(prompt="x").to_sampling_params().max_tokens == 16  # OpenAI default
    assert CompletionRequest(prompt="x", seed=-1).to_sampling_params().seed == 2**63 - 1


@pytest.mark.parametrize(
    "prompt, prompts",
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_prompt_forms(prompt: object, prompts: list[object]) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == prompts


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": 5}, {"prompt": [1.5]}, {"prompt": [[]]}, {"prompt": [True]},
        {"prompt": "x", "n": True}, {"prompt": "x", "stop": ["a"] * 17},
        {"prompt": "x", "temperature": "hot"}, {"prompt": "x", "top_k": -2},
        {"prompt": "x", "stream_options": {"include_usage": "maybe"}},
    ],
)  # fmt: skip
def test_completion_rejects(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_unknown_fields_are_ignored() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "presence_penalty": 0.5, "foo": 1})
    assert not hasattr(req, "foo")


def test_chat_request() -> None:
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}],
         "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 3, "stop": "\n",
         "stream": True, "stream_options": {"include_usage": True}}
    )  # fmt: skip
    assert req.messages[0].text() == "ab" and req.requested_max_tokens() == 9
    p = req.to_sampling_params(9)
    assert p.logprobs == 3 and p.prompt_logprobs is None and req.stop_strings() == ("\n",)
    assert req.include_usage()
    plain = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    assert plain.to_sampling_params(4).logprobs is None and not plain.include_usage()
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
        )
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": 5}]})
