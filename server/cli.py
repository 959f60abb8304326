"""`soft-serve`: the OpenAI-compatible server. Every option is a flag and a `SOFT_*`
environment variable (server/settings.py); flags win over the environment."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any

from pydantic import ValidationError

from server.settings import Settings

EPILOG = """\
examples:
  soft-serve                                  # the embedded default model on 127.0.0.1:8000
  soft-serve --model ./ckpt --policy budget --kv-cache-memory 2GiB
  SOFT_API_KEY=secret soft-serve --host 0.0.0.0

  curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
       -H 'x-latency-budget: 250ms' -d '{"model": "default", "prompt": "Hi", "max_tokens": 8}'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soft-serve",
        description="OpenAI-compatible server for sorted (SoFT) models: /v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /version, /metrics. Depth per request "
        "from x-latency-budget, 'model@depth' or x-soft-depth.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "SOFT_" + name.upper()
        default = info.default
        if name == "api_key":
            default = "none"
        elif hasattr(default, "human_readable"):
            default = default.human_readable(decimal=False)
        help_ = f"{info.description} [env {env}; default {default}]"
        kwargs: dict[str, Any] = {"help": help_, "default": None, "dest": name}
        if info.annotation is bool:  # --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction
        choices = getattr(info.annotation, "__args__", None)
        if name in ("policy", "dtype", "log_level") and choices:
            kwargs["choices"] = [c for c in _literal_values(info.annotation) if c is not None]
        if isinstance(info.annotation, type) and issubclass(info.annotation, Enum):
            kwargs["choices"] = [m.value for m in info.annotation]
        parser.add_argument(flag, **kwargs)
    return parser


def _literal_values(annotation: Any) -> list[Any]:
    out: list[Any] = []
    for arg in getattr(annotation, "__args__", ()):
        out.extend(_literal_values(arg) if hasattr(arg, "__args__") else [arg])
    return [a for a in out if a is not type(None)]


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Flags given on the command line override SOFT_* variables, which override defaults."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        lines = [
            f"  --{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}"
            for err in e.errors()
        ]
        print("soft-serve: invalid settings\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    import uvicorn

    from server.http.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    failed: list[bool] = []
    server: uvicorn.Server | None = None

    def stop_on_load_error() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=stop_on_load_error)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout) or None,
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = uvicorn.Server(config)
    server.run()  # SIGTERM/SIGINT: stop accepting, drain in-flight requests, then the lifespan
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
