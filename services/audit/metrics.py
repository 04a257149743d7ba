"""Prometheus metrics of the audit service (served on ``/metrics`` by the runtime).

Throughput is ``rate(vge_audit_records_appended_total[1m])``; lag is the publish-to-record time of
each record; the events still waiting in the durable consumer are ``vge_consumer_pending{consumer="audit"}``
(``libs.jetstream``, as for every consumer).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = [
    "RECORDS_APPENDED",
    "DUPLICATES_SKIPPED",
    "INGEST_BATCH_SIZE",
    "INGEST_SECONDS",
    "RECORD_LAG_SECONDS",
    "CROSS_TENANT_READS",
]

RECORDS_APPENDED = Counter("vge_audit_records_appended_total", "Audit records appended to chains")
DUPLICATES_SKIPPED = Counter(
    "vge_audit_duplicates_skipped_total", "Events received again and skipped (already recorded)"
)
INGEST_BATCH_SIZE = Histogram(
    "vge_audit_ingest_batch_size",
    "Events per ingest transaction",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
INGEST_SECONDS = Histogram(
    "vge_audit_ingest_seconds",
    "Time to append one batch (one transaction)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RECORD_LAG_SECONDS = Histogram(
    "vge_audit_record_lag_seconds",
    "From the event's occurred_at to its audit record being committed",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 1.0, 2.5, 5.0,
             10.0, 30.0, 60.0),
)
CROSS_TENANT_READS = Counter(
    "vge_audit_cross_tenant_reads_total", "Platform-admin reads of another tenant's audit log"
)
