"""``llm-proxy loadtest``: drive a deployment with concurrent clients, then reconcile spend.

N client coroutines share one pooled aiohttp session and send chat completions (or, with
``--api anthropic``, Anthropic Messages requests) over M keys, buffered or streamed, for a
fixed time or a fixed number of requests (both capped, so a run always ends by itself). By
default each client sends its next request when the previous answer arrives (closed loop:
latency at saturation, mostly queueing); with ``--rate`` requests are due on a fixed schedule
instead (open loop), so two deployments can be compared at the same load.
The report gives throughput, latency percentiles, status counts and rejections by
``error.code``, and checks the accounting end to end: the tokens and cost the upstream reported
(its ``usage``, incl. the final usage chunk of streams) against what the proxy recorded (the
spend the budget API shows for each key, read before and after the run).

Reading spend needs an admin key (``--admin-key`` or ``PROXY_ADMIN_KEY``): it maps keys to their
ids and, for a key with no budget, adds a temporary alert-only budget so the spend is visible
(removed afterwards). Without one the run is reported unreconciled. The client is meant to be
cheap (request bodies built once, only usage-bearing stream chunks parsed) because it usually
shares the machine with what it measures.

Modules: ``cli`` (arguments, the run from setup to cleanup, exit status), ``plan`` (limits,
keys, request bodies), ``runner`` (the clients), ``tally`` (what the upstream reported),
``reconcile`` (what the proxy recorded, compared), ``report`` (JSON and table).
"""

from proxy.tools.loadtest.cli import add_arguments, main, run_loadtest
from proxy.tools.loadtest.plan import (
    WAKE_EARLY_S,
    LoadKey,
    LoadtestError,
    Plan,
    synthetic_prompt,
)
from proxy.tools.loadtest.reconcile import AdminClient, Reconciler, SpendReading, reconcile
from proxy.tools.loadtest.report import build_report, percentiles, render
from proxy.tools.loadtest.runner import Runner
from proxy.tools.loadtest.tally import KeyUsage, Tally

__all__ = [
    "WAKE_EARLY_S",
    "AdminClient",
    "KeyUsage",
    "LoadKey",
    "LoadtestError",
    "Plan",
    "Reconciler",
    "Runner",
    "SpendReading",
    "Tally",
    "add_arguments",
    "build_report",
    "main",
    "percentiles",
    "reconcile",
    "render",
    "run_loadtest",
    "synthetic_prompt",
]
