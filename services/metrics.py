"""Prometheus metrics (the vocabulary of DESIGN.md), exported by whichever process serves ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# `*_created` series double every counter and no dashboard uses them.
disable_created_metrics()

SIMULATIONS = Counter("surge_simulations_total", "Simulations finished, by outcome", ["study", "status"])
SAMPLES_PRODUCED = Counter("surge_samples_produced_total", "Samples produced by the solvers", ["study"])
SAMPLES_CONSUMED = Counter("surge_samples_consumed_total", "Samples handed to the trainer", ["study"])
SAMPLES_DUPLICATE = Counter(
    "surge_samples_duplicate_total", "Samples dropped because the buffer already received them", ["study"]
)
BUFFER_SAMPLES = Gauge("surge_buffer_samples", "Samples held in the buffer", ["study"])
BUFFER_CAPACITY = Gauge("surge_buffer_capacity_samples", "Buffer capacity in samples", ["study"])
BUFFER_EVICTIONS = Counter("surge_buffer_evictions_total", "Samples evicted or discarded by the buffer", ["study"])
DATA_WAIT = Counter("surge_trainer_data_wait_seconds_total", "Time the trainer waited for data", ["study"])
TRAIN_STEPS = Counter("surge_train_steps_total", "Optimiser steps taken", ["study"])
TRAIN_LOSS = Gauge("surge_train_loss", "Latest training loss (relative L2)", ["study"])
VALIDATION_ERROR = Gauge("surge_validation_error", "Latest validation relative L2 error", ["study"])
STUDIES_RUNNING = Gauge("surge_studies_running", "Studies currently running")

PREDICT_REQUESTS = Counter("surge_predict_requests_total", "Predict requests", ["model", "code"])
PREDICT_LATENCY = Histogram(
    "surge_predict_latency_seconds",
    "Predict latency (server side)",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
MODEL_VERSION = Gauge("surge_model_version", "Model version being served", ["model"])
