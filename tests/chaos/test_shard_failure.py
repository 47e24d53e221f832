"""Chaos: a buffer shard's process is killed with SIGKILL, while simulations stream and after the last one.

Ray restarts the shard empty in a new process; the calls that were out on it run again there, so
the producers and the trainer rank only wait (counted as data wait), the stream refills it, and
the driver re-closes a shard that restarts after the buffer was closed (else its rank would wait
for ever). The study completes; under FIFO no sample reaches the trainer twice.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray

from services.config import parse_config
from services.study import Study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

STEPS = 10  # recorded steps per simulation
SIMS = 100  # the budget of the "closed" case


def _config(simulations: int, capacity: int, steps: int, watermark: int = 40, hidden: int = 16) -> dict:
    return {
        "name": "shard-kill",
        "problem": {"config": {"n": 16, "steps": STEPS, "dt": 0.005}},
        "simulations": simulations,
        "solvers": {"actors": 1, "sims_per_call": 2, "chunk_steps": 5},
        "buffer": {"policy": "fifo", "capacity": capacity, "watermark": watermark},
        "training": {
            "model": "mlp",
            "arch": {"hidden": hidden, "layers": 4 if hidden > 16 else 1},
            "batch_size": 8,
            "steps": steps,
            "validate_every": 100,
            "validation_simulations": 2,
            "threads": 1,
        },
    }


@pytest.mark.parametrize(
    "when",
    [
        # While solvers stream into a small buffer: producers and the rank wait, then it refills.
        "streaming",
        # Once every simulation is in a buffer that holds them all: the new shard must be closed again.
        "closed",
    ],
)
def test_a_killed_buffer_shard_is_restarted_and_the_study_completes(tmp_path, when: str) -> None:
    if when == "streaming":
        cfg = _config(simulations=100_000, capacity=100, steps=300)
    else:
        # The trainer starts once the buffer holds every sample (the watermark) and, with a large model,
        # takes seconds to drain it; the stream ends first.
        cfg = _config(simulations=SIMS, capacity=2000, steps=100_000, watermark=SIMS * (STEPS + 1), hidden=2048)
    study = Study(parse_config(cfg), tmp_path)
    study.record_keys = True
    study.start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            snap = study.snapshot()
            if when == "streaming" and snap["training"]["step"] >= 60:
                break
            if when == "closed" and study.shards:
                st = ray.get(study.shards[0].stats.remote())
                if st["closed"] and st["held"] > 100:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"the study did not get there in time: {study.snapshot()}")
        (shard,) = study.shards
        pid = ray.get(shard.pid.remote())
        os.kill(pid, signal.SIGKILL)
        assert study.join(240), "study did not finish in time"
        snap = study.snapshot()
        assert snap["state"] == "finished", snap["error"]
        assert snap["buffer"]["restarts"] == 1
        assert ray.get(shard.pid.remote()) != pid  # a new process served on
        tr = snap["training"]
        if when == "streaming":
            assert tr["step"] == 300  # the whole step budget, with the shard's wait counted as data wait
            assert tr["data_wait_s"] > 0
        else:
            # What the dead shard held was lost; the trainer saw the end of the stream instead of waiting.
            assert tr["samples_seen"] < SIMS * (STEPS + 1)
        (rank,) = study.rank_states.values()
        keys = rank["keys"]  # (2, n): sim_id, t_index of every row trained on
        pairs = keys[0] * (STEPS + 1) + keys[1]
        assert np.unique(pairs).size == pairs.size, "a sample reached the trainer twice"
    finally:
        if study.running:
            study.stop()
            study.join(60)
        study.release()
