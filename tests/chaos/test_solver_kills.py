"""Chaos: a solver actor's process is killed with SIGKILL every few seconds while a study runs.

Each kill fails the attempt of the simulations its call held; Ray restarts the actor and those
simulations run again (alone, within ``solvers.max_attempts``). The study completes; no
simulation is lost or completed twice, every completed one reached the buffer whole, and under
FIFO no sample reached the trainer twice (what a re-run sends again is dropped by key) and none
was lost (the reference holding the killed process's error is never put in place of a chunk).
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

STEPS = 10
KILLS = 4
EVERY_S = 2.0


def test_solver_actors_killed_every_few_seconds_lose_nothing(tmp_path) -> None:
    cfg = {
        "name": "solver-kills",
        "problem": {"config": {"n": 96, "steps": STEPS, "dt": 0.005}},
        "simulations": 400,
        "sampler": {"seed": 5},
        # Calls of some tenths of a second into a buffer that does not hold them back: a kill lands mid-call.
        "solvers": {"actors": 2, "sims_per_call": 8, "chunk_steps": 2, "max_attempts": 6},
        "buffer": {"policy": "fifo", "capacity": 4000, "watermark": 50},
        "training": {
            "arch": {"hidden": 64, "layers": 2},
            "batch_size": 8,
            "steps": 100_000,  # the stream ends first
            "validate_every": 200,
            "validation_simulations": 2,
            "threads": 1,
        },
    }
    study = Study(parse_config(cfg), tmp_path)
    study.record_keys = True
    study.start()
    killed: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and study.snapshot()["samples"]["received"] < 100:
            time.sleep(0.05)
        while len(killed) < KILLS and study.running:
            victim = study.actors[len(killed) % 2]
            try:
                pid = ray.get(victim.pid.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                continue  # being restarted: ask again
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            time.sleep(EVERY_S)
        # Each killed process was replaced by a new one (asked while the study runs, before its teardown).
        while study.running:
            try:
                pids = set(ray.get([a.pid.remote() for a in study.actors], timeout=30))
                break
            except ray.exceptions.RayActorError:
                time.sleep(0.2)  # being restarted
        assert not pids & set(killed)
        assert study.join(300), "study did not finish in time"
        snap = study.snapshot()
        print(f"{len(killed)} kills; simulations {snap['simulations']}; duplicates {snap['samples']['duplicates']}")
        assert len(killed) == KILLS, "the study ended before the kills: make it longer"
        assert snap["state"] == "finished", snap["error"]
        sims = snap["simulations"]
        assert sims["done"] == 400 and sims["failed"] == 0
        # Kills landed mid-call: the simulations of the killed calls were handed out again (as a
        # retried attempt, or without cost when the call had not yet started).
        assert sims["dispatched"] > 400
        done = study.done_ids
        assert sorted(done) == list(range(400))  # none lost, none completed twice
        got = study.received_by_sim()
        assert all(got[i] == STEPS + 1 for i in done)  # each arrived whole, once
        (rank,) = study.rank_states.values()
        pairs = rank["keys"][0] * (STEPS + 1) + rank["keys"][1]
        assert np.unique(pairs).size == pairs.size == 400 * (STEPS + 1)
    finally:
        if study.running:
            study.stop()
            study.join(60)
        study.release()
