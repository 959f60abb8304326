"""temporary"""

from server.serving.chat import ChatServing
from server.serving.completion import CompletionServing


class OpenAIServing(CompletionServing, ChatServing):
    """POST /v1/completions (`completions`), POST /v1/chat/completions (`chat`),
    GET /v1/models (`models`)."""
