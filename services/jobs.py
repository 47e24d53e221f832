"""Studies as Ray jobs: the gateway submits them to a Ray cluster's job API and follows them.

Each job runs ``surge train`` on the cluster with the study config in its environment; the
job's driver writes progress snapshots next to the models (a volume the gateway shares), so
the gateway answers ``GET /v1/studies/{id}`` and exports the study's metrics without holding
a Ray connection — it keeps serving models when the cluster is gone.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

from services.config import StudyConfig, parse_config
from services.metrics import PROGRESS_DIR
from services.snapshot import StudySnapshot, StudyState
from services.study import StudiesUnavailable

CONFIG_ENV = "SURGE_STUDY_CONFIG"
log = logging.getLogger("surge.jobs")
SUBMIT_PATIENCE_S = 60.0
RESUME_PATIENCE_S = 30.0  # for the job of a driver that has reported its end to exit
_JOB_STATES = {
    "PENDING": "starting",
    "RUNNING": "running",
    "SUCCEEDED": "finished",
    "STOPPED": "stopped",
    "FAILED": "failed",
}


def _job_state(job: Any) -> str:
    return str(job.status).rsplit(".", 1)[-1]


class RayJobStudies:
    """The gateway's study backend on a Ray cluster (``SURGE_RAY_JOBS_ADDRESS``, the job API's http address)."""

    def __init__(self, address: str, store: str | Path, max_running: int | None = None) -> None:
        self.address = address
        self.store = Path(store)
        self.max_running = max_running

    def _client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.address)
        except Exception as e:  # ConnectionError, or the cluster answering something else
            raise StudiesUnavailable(f"cannot reach the Ray cluster's job API at {self.address}: {e}") from None

    def submit(self, config: StudyConfig) -> dict[str, Any]:
        self._check_limit()
        study_id = f"{config.name}-{uuid.uuid4().hex[:8]}"
        entrypoint = (
            f"surge train --config-env {CONFIG_ENV} --study-id {shlex.quote(study_id)} "
            f"--store {shlex.quote(str(self.store))}"
        )
        self._submit(entrypoint, study_id, config, study_id)
        return StudySnapshot.pending(study_id, config, StudyState.STARTING).to_dict()

    def _submit(self, entrypoint: str, job_id: str, config: StudyConfig, study_id: str) -> None:
        client = self._client()
        env = {CONFIG_ENV: config.model_dump_json()}
        # No token travels here: Ray shows a job's runtime_env in its dashboard and job API. A study's
        # gRPC ingest reads its token on the node (SURGE_INGEST_TOKEN or SURGE_INGEST_TOKEN_FILE,
        # a mounted Secret in the Helm chart).
        # Ray's job runner sends SIGTERM on stop, then SIGKILL after this many seconds (3 by default): the
        # driver gets the study's grace period to publish its last checkpoint, and some to tear down.
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(config.training.stop_grace_s) + 30)
        meta = {"surge_study": config.name, "surge_config": config.model_dump_json(), "surge_study_id": study_id}
        deadline = time.monotonic() + SUBMIT_PATIENCE_S
        while True:
            try:
                client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, runtime_env={"env_vars": env}, metadata=meta
                )
                break
            except Exception as e:
                # A head that has just started answers "no available agent ... try again later" for a while.
                if "try again later" in str(e) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise StudiesUnavailable(f"the Ray cluster refused the study: {e}") from None

    def _check_limit(self) -> None:
        """``StudyLimitError`` when ``max_running`` studies are starting or running on the cluster.

        Counted from the cluster's jobs, so it holds for every gateway replica; two replicas
        submitting at the same instant may still both pass (the job API has no transaction)."""
        if self.max_running is None:
            return
        from services.study import StudyLimitError

        running = sum(s.get("state") in ("starting", "running") for s in self.statuses())
        if running >= self.max_running:
            raise StudyLimitError(f"{running} studies are running already (limit {self.max_running})")

    def _snapshot_file(self, study_id: str) -> dict[str, Any] | None:
        f = self.store / PROGRESS_DIR / f"{study_id}.json"
        try:
            return StudySnapshot.model_validate_json(f.read_text()).to_dict()
        except (OSError, ValueError):  # not written yet, half-written, or not a snapshot
            return None

    def _merge(self, job: Any) -> dict[str, Any] | None:
        meta = job.metadata or {}
        if "surge_config" not in meta:
            return None  # not a study
        study_id = meta.get("surge_study_id", job.submission_id)  # a resume runs as a job of its own
        state = _JOB_STATES.get(_job_state(job), "running")
        snap = self._snapshot_file(study_id)
        if snap is None:
            error = job.message if state == "failed" else None
            try:
                config = parse_config(json.loads(meta["surge_config"]))
            except (ValueError, TypeError) as e:  # a job of an older Surge, or metadata not ours
                log.warning("Ray job %s: study metadata unreadable, not listed: %s", job.submission_id, e)
                return None
            return StudySnapshot.pending(study_id, config, state, error).to_dict()
        # The job's status wins when the driver could not report its own end (killed, crashed).
        if state in ("failed", "stopped") and snap.get("state") in ("starting", "running"):
            snap = {**snap, "state": state, "error": snap.get("error") or job.message}
        return snap

    def _latest_jobs(self) -> dict[str, Any]:
        """The newest job of every study (its first run, or its latest resume), by study id."""
        try:
            jobs = self._client().list_jobs()
        except StudiesUnavailable:
            raise
        except Exception as e:
            raise StudiesUnavailable(f"cannot reach the Ray cluster's job API at {self.address}: {e}") from None
        latest: dict[str, Any] = {}
        for j in sorted(jobs, key=lambda j: j.start_time or 0):
            meta = j.metadata or {}
            if "surge_config" in meta:
                latest[meta.get("surge_study_id", j.submission_id)] = j
        return latest

    def status(self, study_id: str) -> dict[str, Any] | None:
        job = self._latest_jobs().get(study_id)
        return self._merge(job) if job is not None else None

    def statuses(self) -> list[dict[str, Any]]:
        return [s for j in self._latest_jobs().values() if (s := self._merge(j)) is not None]

    def cancel(self, study_id: str) -> dict[str, Any] | None:
        job = self._latest_jobs().get(study_id)
        if job is None:
            return None
        snap = self._merge(job)
        self._client().stop_job(job.submission_id)
        return snap

    def resume(self, study_id: str) -> dict[str, Any] | None:
        """A job that runs ``surge resume`` for a study whose last job ended (or whose driver died)."""
        from services.study import StudyNotResumable, StudyRunning, resumable_config

        job = self._latest_jobs().get(study_id)
        if job is None:
            return None
        # A driver that has reported its end (stopped, failed) is tearing down: give its job a moment to end.
        deadline = time.monotonic() + RESUME_PATIENCE_S
        while _job_state(job) in ("PENDING", "RUNNING"):
            snap = self._snapshot_file(study_id) or {}
            if snap.get("state") in ("starting", "running") or time.monotonic() > deadline:
                raise StudyRunning(f"study {study_id!r} is running (Ray job {job.submission_id})")
            time.sleep(1.0)
            job = self._latest_jobs().get(study_id, job)
        # Checked here (the store is shared with the cluster) so that the caller hears at once.
        config = resumable_config(self.store, study_id)
        if config is None:
            raise StudyNotResumable(f"study {study_id!r} has no state in {self.store} to resume from")
        self._check_limit()
        entrypoint = f"surge resume {shlex.quote(study_id)} --store {shlex.quote(str(self.store))}"
        self._submit(entrypoint, f"{study_id}-resume-{uuid.uuid4().hex[:6]}", config, study_id)
        return StudySnapshot.pending(study_id, config, StudyState.STARTING).to_dict()
