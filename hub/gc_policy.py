"""How the hub's own processes (`hub run` and its ingest workers) run CPython's garbage collector.

The default collects the young generation every 700 net allocations, which suits short scripts. The hub allocates a
few objects per message at thousands of messages a second, and a batch's messages (hundreds of them, with their
headers, bodies and queue entries) are still alive at several of those collections: they are promoted, die in the
old generation, and so bring on full collections over the whole heap. bench/ingest.py measured it (2,000 nodes,
14,000 messages/s): 11-15 full collections in 30 s at 40-50 ms of CPU each, 12-16% of the core process's CPU, and
the core's cost per message fell from 26 to 22 us with a young generation of 20,000, where a batch dies young.

Reference cycles are still collected, only later (after at most 20,000 allocations instead of 700). `freeze_loaded`
takes what the start loaded (journal, snapshot, registry: it lives as long as the process) out of every later
collection, after a collection of its own so no garbage is frozen with it. The agent keeps CPython's settings: it
allocates little, and its idle memory counts on a small device.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG: Final = 20_000  # allocations between young collections (CPython's default: 700); older generations as default


def for_throughput() -> None:
    """At the start of a hub process, before it loads anything."""
    gc.set_threshold(YOUNG)  # the older generations' thresholds stay as they are


def freeze_loaded() -> None:
    """Once the process has loaded its state: that state is left out of every later collection."""
    gc.collect()
    gc.freeze()
