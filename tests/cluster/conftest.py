"""Scale-out tests: a real multi-node Ray cluster on loopback, nodes declaring GPUs.

Must be set before Ray starts: token auth breaks local clients, and workers inherit these.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
