"""Open-loop load generator for OpenAI-compatible servers (`python -m loadtest --help`).

schedule: when requests arrive and what they ask for (pure, seeded) · client: sends one
request and measures it · runner: the open-loop run · report: the summary and its
markdown · plots: the PNGs · output: a run's files (JSON, markdown, plots).
"""

from loadtest.client import ClientConfig, OpenAIClient, RequestRecord
from loadtest.output import write_report
from loadtest.report import Summary, summarize
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
