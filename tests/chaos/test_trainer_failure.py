"""Chaos: the Ray Train worker's process is killed with SIGKILL mid-study.

The worker group restarts from the last checkpoint (one per validation), loses at most one
checkpoint interval of steps, and the study completes its step budget and keeps publishing.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from services.config import parse_config
from services.study import Study
from trainer.store import ModelStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

EVERY = 50  # validate, publish and checkpoint every EVERY steps


def test_a_killed_trainer_worker_resumes_from_its_last_checkpoint(tmp_path) -> None:
    cfg = parse_config(
        {
            "name": "trainer-kill",
            "problem": {"config": {"n": 16, "steps": 20, "dt": 0.005}},
            "simulations": 100_000,
            "solvers": {"actors": 1, "sims_per_call": 4, "chunk_steps": 5},
            "buffer": {"policy": "reservoir", "capacity": 2000, "watermark": 200},
            "training": {
                "model": "mlp",
                "arch": {"hidden": 32, "layers": 2},
                "batch_size": 16,
                "steps": 400,
                "validate_every": EVERY,
                "validation_simulations": 2,
                "max_failures": 1,
                "threads": 1,
            },
        }
    )
    study = Study(cfg, tmp_path).start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline and study.snapshot()["training"]["step"] < 2 * EVERY + 20:
            time.sleep(0.05)
        pid = ray.get(study.control.pids.remote())[0]
        step_at_kill = study.snapshot()["training"]["step"]
        version_at_kill = study.snapshot()["training"]["version"]
        assert step_at_kill >= 2 * EVERY + 20 and version_at_kill is not None
        os.kill(pid, signal.SIGKILL)
        assert study.join(300), "study did not finish in time"
        snap = study.snapshot()
        assert snap["state"] == "finished", snap["error"]
        tr = snap["training"]
        assert tr["step"] == 400  # the whole budget, after the restart
        assert tr["restarts"] == 1
        (resumed,) = tr["resumed_at"]
        print(f"killed at step {step_at_kill}, resumed at step {resumed}")
        assert resumed % EVERY == 0
        # At most one checkpoint interval lost: the last checkpoint before the kill, or a later one.
        assert step_at_kill - EVERY < resumed <= step_at_kill + EVERY
        assert ray.get(study.control.pids.remote())[0] != pid  # a new worker process trained on
        # Versions published after the restart, the last at the final step.
        store = ModelStore(tmp_path)
        assert store.latest("heat2d") > version_at_kill
        assert store.card("heat2d").training.train_steps == 400
    finally:
        if study.running:
            study.stop()
            study.join(60)
        study.release()
