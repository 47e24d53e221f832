"""Prometheus metrics (the vocabulary of DESIGN.md).

Gateway metrics (predictions) are prometheus-client objects in the gateway process. Study
metrics are read at scrape time from the studies' progress snapshots (``<store>/.studies``),
which every study driver writes — in the gateway's process (embedded) or as a Ray job
anywhere in the cluster — so the gateway exports the same series in both cases.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.snapshot import StudySnapshot

# `*_created` series double every counter and no dashboard uses them.
disable_created_metrics()

PREDICT_REQUESTS = Counter("surge_predict_requests_total", "Predict requests", ["model", "code"])
PREDICT_LATENCY = Histogram(
    "surge_predict_latency_seconds",
    "Predict latency (server side)",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PREDICT_FALLBACKS = Counter(
    "surge_predict_fallbacks_total",
    "Predict fallbacks to the solver (fallback=solve) by outcome: solved, busy, unavailable, timeout, failed, refused",
    ["model", "outcome"],
)
MODEL_VERSION = Gauge("surge_model_version", "Model version being served", ["model"])

PROGRESS_DIR = ".studies"
STALE_AFTER_S = 60.0  # a running study whose snapshot is older than this has lost its driver
MAX_STUDIES = 100  # newest snapshots exported; older studies drop out of the series

# (metric name, help, path into the snapshot) for the per-study counters and gauges.
_COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "surge_samples_produced",
        "Samples produced, by source (solver actors, external solvers)",
        ("samples", "produced"),
    ),
    ("surge_samples_consumed", "Samples handed to the trainer", ("samples", "consumed")),
    ("surge_samples_duplicate", "Samples dropped as already received (re-run simulations)", ("samples", "duplicates")),
    ("surge_buffer_evictions", "Samples evicted or discarded by the buffer", ("buffer", "evicted")),
    ("surge_buffer_shard_restarts", "Buffer shard processes that died and were restarted", ("buffer", "restarts")),
    ("surge_trainer_restarts", "Trainer worker-group restarts from a checkpoint", ("training", "restarts")),
    ("surge_trainer_data_wait_seconds", "Time the trainer waited for data", ("training", "data_wait_s")),
    ("surge_trainer_compute_seconds", "Time the trainer spent in optimiser steps", ("training", "compute_s")),
    ("surge_train_steps", "Optimiser steps taken", ("training", "step")),
)
# Counters split by a ``source`` label: every series carries one, so ``sum by (study)`` adds the sources up.
# (name -> snapshot keys under "samples" per source); snapshots written before sources existed count as actors.
_BY_SOURCE: dict[str, dict[str, str]] = {
    "surge_samples_produced": {"actors": "produced_actors", "external": "produced_external"},
}
_GAUGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("surge_buffer_samples", "Samples held in the buffer", ("buffer", "held")),
    ("surge_buffer_capacity_samples", "Buffer capacity in samples", ("buffer", "capacity")),
    ("surge_train_loss", "Latest training loss (relative L2)", ("training", "loss")),
    ("surge_validation_error", "Latest validation relative L2 error", ("training", "validation_error")),
    ("surge_model_published_version", "Newest model version the study published", ("training", "version")),
)


def read_snapshots(store: Path, limit: int = MAX_STUDIES) -> list[dict[str, Any]]:
    """The newest study snapshots under ``store`` (unreadable or half-written files are skipped)."""
    d = Path(store) / PROGRESS_DIR
    if not d.is_dir():
        return []
    files = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    out = []
    for f in files[:limit]:
        try:
            out.append(StudySnapshot.model_validate_json(f.read_text()).to_dict())
        except (OSError, ValueError):  # half-written, or not a snapshot
            continue
    return out


def is_live(snap: dict[str, Any], now: float | None = None) -> bool:
    """Running, and its driver wrote the snapshot recently."""
    now = time.time() if now is None else now
    return snap.get("state") in ("starting", "running") and now - snap.get("updated_at", 0) < STALE_AFTER_S


def _get(snap: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = snap
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _by_source(name: str, doc: str, path: tuple[str, ...], snaps: list[dict[str, Any]]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=["study", "source"])
    keys = _BY_SOURCE[name]
    for s in snaps:
        total = _get(s, path)
        if total is None:
            continue
        parts = {src: _get(s, (path[0], key)) for src, key in keys.items()}
        if parts["actors"] is None:  # an older snapshot: no split, all from the actors
            parts = {src: (total if src == "actors" else 0.0) for src in keys}
        for src, v in parts.items():
            fam.add_metric([s["id"], src], v or 0.0)
    return fam


class StudyCollector(Collector):
    """Exports every study's figures from its progress snapshot at scrape time."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)

    def collect(self) -> Iterator[Metric]:
        snaps = read_snapshots(self.store)
        sims = CounterMetricFamily(
            "surge_simulations",
            "Simulations finished, by outcome (retried: attempts run again)",
            labels=["study", "status"],
        )
        for s in snaps:
            for status in ("done", "failed", "cancelled", "retried"):
                sims.add_metric([s["id"], status], float(s.get("simulations", {}).get(status, 0)))
        yield sims
        for name, doc, path in _COUNTERS:
            if name in _BY_SOURCE:
                yield _by_source(name, doc, path, snaps)
                continue
            fam = CounterMetricFamily(name, doc, labels=["study"])
            for s in snaps:
                v = _get(s, path)
                if v is not None:
                    fam.add_metric([s["id"]], v)
            yield fam
        for name, doc, path in _GAUGES:
            gfam = GaugeMetricFamily(name, doc, labels=["study"])
            for s in snaps:
                v = _get(s, path)
                if v is not None:
                    gfam.add_metric([s["id"]], v)
            yield gfam
        now = time.time()
        yield GaugeMetricFamily(
            "surge_studies_running", "Studies running now", value=sum(is_live(s, now) for s in snaps)
        )
