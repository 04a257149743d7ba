"""Prometheus metrics of the scanning service's decisions (served on ``/metrics`` by the runtime).

What a venue's operators watch at the gates: ``rate(vge_scans_decided_total{result="rejected"}[1m])``
by ``reason`` (a rise of ``unknown_ticket`` is forged tickets or a registry behind payments, one of
``already_admitted`` is tickets passed on), and the offline admissions flagged as conflicts. The
batch histograms (``vge_scan_batch_*``) are in ``adapters/batching.py``.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter

__all__ = ["SCANS_DECIDED", "OFFLINE_CONFLICTS", "count_decisions"]

SCANS_DECIDED = Counter(
    "vge_scans_decided_total",
    "Scans decided by the authority, by mode (online: at a gate; offline: uploaded), result and "
    "reason (empty for accepted); a retry of a decided scan is not counted again",
    ["mode", "result", "reason"],
)
OFFLINE_CONFLICTS = Counter(
    "vge_scan_offline_conflicts_total",
    "Offline scans a device let through that the rules refuse (e.g. the same ticket at two gates: "
    "the later of the two, whichever was uploaded first)",
)


def count_decisions(decisions: Iterable[dict[str, Any]], mode: str) -> None:
    """Count a batch's decisions: one increment per distinct outcome, not one per scan (an
    upload is 10,000 scans)."""
    tally: Tally[tuple[str, str]] = Tally()
    conflicts = 0
    for d in decisions:
        if d["replayed"]:
            continue
        tally[(d["result"], d["reason"] or "")] += 1
        # an earlier offline admission uploaded after a later one takes its place ("swap"):
        # the later one, counted as accepted when it came, is the conflict now
        conflicts += bool(d["conflict"]) + bool(d.get("swap"))
    for (result, reason), n in tally.items():
        SCANS_DECIDED.labels(mode, result, reason).inc(n)
    if conflicts:
        OFFLINE_CONFLICTS.inc(conflicts)
