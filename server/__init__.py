"""The serving side of soft-serve: engine (scheduler, KV cache, sampling), depth policy,
OpenAI-compatible API, Prometheus metrics, CLI."""
