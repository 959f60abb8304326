"""Open-loop load generator for OpenAI-compatible servers (`python -m loadtest --help`).

schedule: when requests arrive and what they ask for (pure, seeded) · client: sends one
request and measures it · runner: the open-loop run · report/plots: summary, JSON,
markdown and PNG files.
"""

from loadtest.client import ClientConfig, OpenAIClient, RequestRecord
from loadtest.report import Summary, summarize, write_report
from loadtest.runner import RunConfig, RunResult, run
from loadtest.schedule import PlannedRequest, Workload, arrival_times, plan_requests

__all__ = [
    "ClientConfig",
    "OpenAIClient",
    "PlannedRequest",
    "RequestRecord",
    "RunConfig",
    "RunResult",
    "Summary",
    "Workload",
    "arrival_times",
    "plan_requests",
    "run",
    "summarize",
    "write_report",
]
