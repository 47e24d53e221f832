"""The Ray-jobs study backend against a stand-in job API (no cluster): limits and foreign metadata."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from services.config import parse_config
from services.jobs import RayJobStudies
from services.study import StudyLimitError

CONFIG = parse_config({"name": "j", "problem": {"config": {"n": 8, "steps": 4, "dt": 0.01}}, "simulations": 4})


class FakeJobs:
    """What ``JobSubmissionClient`` answers: ``list_jobs``, ``submit_job`` (recorded), ``stop_job``."""

    def __init__(self, jobs: list[Any]) -> None:
        self.jobs = jobs
        self.submitted: list[dict[str, Any]] = []

    def list_jobs(self) -> list[Any]:
        return list(self.jobs)

    def submit_job(self, **kw: Any) -> str:
        self.submitted.append(kw)
        self.jobs.append(_job(kw["submission_id"], "PENDING", kw["metadata"]))
        return kw["submission_id"]


def _job(job_id: str, status: str, metadata: dict[str, str] | None = None) -> Any:
    meta = metadata if metadata is not None else {"surge_config": CONFIG.model_dump_json(), "surge_study_id": job_id}
    return SimpleNamespace(submission_id=job_id, status=status, metadata=meta, message="", start_time=0)


def _backend(tmp_path, jobs: FakeJobs, max_running: int | None) -> RayJobStudies:
    b = RayJobStudies("http://127.0.0.1:1", tmp_path, max_running)
    b._client = lambda: jobs  # type: ignore[method-assign]
    return b


def test_the_running_limit_holds_in_ray_jobs_mode(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SURGE_API_TOKEN", "admin-secret")
    monkeypatch.setenv("SURGE_INGEST_TOKEN", "ingest-secret")
    jobs = FakeJobs([_job("a", "RUNNING"), _job("b", "SUCCEEDED")])
    b = _backend(tmp_path, jobs, max_running=2)
    b.submit(CONFIG)  # one running, one finished: room for one more
    with pytest.raises(StudyLimitError, match=r"2 studies are running already \(limit 2\)"):
        b.submit(CONFIG)  # the pending one counts
    assert len(jobs.submitted) == 1
    # The submitted job carries no token: Ray shows a job's runtime_env to whoever reads its API.
    env = jobs.submitted[0]["runtime_env"]["env_vars"]
    assert not any("TOKEN" in k or "secret" in v for k, v in env.items()), env


def test_jobs_with_unreadable_study_metadata_are_left_out_not_a_500(tmp_path) -> None:
    bad = {"surge_config": json.dumps({"name": "old", "no_such_key": 1}), "surge_study_id": "old"}
    jobs = FakeJobs([_job("good", "RUNNING"), _job("old", "FAILED", bad), _job("x", "RUNNING", {"surge_config": "{"})])
    b = _backend(tmp_path, jobs, max_running=None)
    assert [s["id"] for s in b.statuses()] == ["good"]
    assert b.status("old") is None
