"""The OpenAI serving handlers, one object for the app: completions and chat over one
model and one engine (shared steps in serving_base.py)."""

from server.detokenizer import Detokenizer, Track
from server.serving_base import APIError, Hints, Served, bad_request
from server.serving_chat import ChatServing
from server.serving_completion import CompletionServing

__all__ = ["APIError", "Detokenizer", "Hints", "OpenAIServing", "Served", "Track", "bad_request"]


class OpenAIServing(CompletionServing, ChatServing):
    """POST /v1/completions (`completions`), POST /v1/chat/completions (`chat`),
    GET /v1/models (`models`)."""
