"""Chaos: the process that drives a study (``surge train``) is killed with SIGKILL, then the study is resumed.

The resumed study runs no simulation that had completed (counted by simulation id, from the
ledger and from what its buffer shards receive), goes on training from the last checkpoint
(losing at most one checkpoint interval of steps), and completes its budget. While the driver
lives, a resume is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from services.config import parse_config
from services.ledger import SimulationIds
from services.sampling import Sampler
from services.study import LEDGER_FILE, StudyNotResumable, StudyRunning, resumable, study_dir
from trainer.store import ModelStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

EVERY = 30  # validate, publish and checkpoint every EVERY steps
BUDGET = 160
STEPS = 10  # recorded steps per simulation: STEPS + 1 samples each
STUDY = "driver-kill"

CONFIG = {
    "name": "driver-kill",
    "problem": {"config": {"n": 16, "steps": STEPS, "dt": 0.005}},
    "simulations": BUDGET,
    "sampler": {"seed": 11},
    "solvers": {"actors": 1, "sims_per_call": 2, "chunk_steps": 5},
    # A small buffer holds the solvers back: simulations complete as fast as the trainer consumes them.
    "buffer": {"policy": "fifo", "capacity": 100, "watermark": 40},
    "training": {
        "model": "mlp",
        "arch": {"hidden": 16, "layers": 1},
        "batch_size": 8,
        "steps": 100_000,  # the stream ends first
        "validate_every": EVERY,
        "validation_simulations": 2,
        "threads": 1,
    },
}


def _progress(store: Path) -> dict:
    try:
        return json.loads((study_dir(store, STUDY).parent / f"{STUDY}.json").read_text())
    except (OSError, ValueError):
        return {}


def _done_in_ledger(store: Path, tmp: Path) -> list[int]:
    """The done ids the journal records (read from a copy: replaying writes on to the file it reads)."""
    copy = tmp / "ledger-copy.jsonl"
    shutil.copy(study_dir(store, STUDY) / LEDGER_FILE, copy)
    spec = parse_config(CONFIG).problem.spec()
    ledger = SimulationIds.replay(copy, Sampler(spec.params, "uniform", 11), 11, BUDGET, 3)
    ledger.close()
    return list(ledger.done)


def test_a_killed_driver_is_resumed_without_running_a_completed_simulation_again(tmp_path: Path) -> None:
    store = tmp_path / "store"
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text(json.dumps(CONFIG))  # JSON is YAML
    address = ray.get_runtime_context().gcs_address
    log = (tmp_path / "driver.log").open("w")
    argv = ["train", str(cfg_file), "--store", str(store), "--study-id", STUDY, "--address", address]
    driver = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            p = _progress(store)
            tr = p.get("training", {})
            if tr.get("version") is not None and tr.get("step", 0) >= EVERY + 5 and p["simulations"]["done"] >= 8:
                break
            time.sleep(0.1)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        # While the driver lives, its study cannot be resumed (nor its journal touched).
        with pytest.raises(StudyRunning, match=f"process {driver.pid}"):
            resumable(store, STUDY)
        seen = _progress(store)
        step_seen = seen["training"]["step"]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    done_before = _done_in_ledger(store, tmp_path)
    assert 8 <= len(done_before) < BUDGET
    # Ray reaps the dead driver's actors (solvers, shards, trainer): wait until their CPUs are back.
    deadline = time.time() + 60
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.5)

    study = resumable(store, STUDY)
    assert study is not None and study.resumed
    study.start()
    try:
        assert study.join(300), "resumed study did not finish in time"
        snap = study.snapshot()
        assert snap["state"] == "finished", snap["error"]
        # The budget is complete over both lives; each simulation completed once.
        assert snap["simulations"]["done"] == BUDGET
        assert len(study.done_ids) == len(set(study.done_ids)) == BUDGET
        assert set(done_before) <= set(study.done_ids)
        # No completed simulation ran again: none of their samples reached the resumed study's shards.
        received = study.received_by_sim()
        assert received and not set(received) & set(done_before)
        assert all(n == STEPS + 1 for n in received.values())  # each re-run or new one arrived whole, once
        # Training went on from the last checkpoint: at most one interval lost.
        tr = snap["training"]
        (resumed_at,) = tr["resumed_at"]
        print(f"driver killed at step >= {step_seen} with {len(done_before)} done; resumed at step {resumed_at}")
        assert resumed_at % EVERY == 0 and resumed_at >= step_seen - EVERY
        assert tr["step"] > resumed_at and ModelStore(store).card("heat2d").training.train_steps == tr["step"]
    finally:
        if study.running:
            study.stop()
            study.join(60)
        study.release()
    # A finished study is not resumed again.
    with pytest.raises(StudyNotResumable, match="finished"):
        resumable(store, STUDY)
