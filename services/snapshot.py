"""The one layout of a study's state, as the driver reports it: progress file, metrics, CLI and REST API.

The driver builds a ``StudySnapshot`` and writes it next to the models; whoever reads it (the
gateway, whether the study runs in its process or as a Ray job; the metrics collector; the CLI)
validates it back into the same model, so a field named here is named the same everywhere.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.config import StudyConfig


class StudyState(StrEnum):
    """Where a study is in its life: ``created`` → ``starting`` → ``running`` → one of the three ends."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"  # its simulation or step budget is spent
    STOPPED = "stopped"  # asked to stop (DELETE, SIGTERM): a last version was published
    FAILED = "failed"  # see ``error``

    @property
    def active(self) -> bool:
        return self in (StudyState.STARTING, StudyState.RUNNING)


class _Part(BaseModel):
    # Snapshots written by an older driver may lack fields (defaults) or carry more (ignored).
    model_config = ConfigDict(extra="ignore")


class Nodes(_Part):
    solvers: list[str] = Field(default_factory=list, description="Ray node ids that ran solver actors")
    trainers: list[str] = Field(default_factory=list, description="Ray node ids that ran trainer ranks")


class SimulationCounts(_Part):
    dispatched: int = Field(0, description="simulations handed out (to actors and external clients)")
    done: int = 0
    failed: int = Field(0, description="given up: every attempt failed, or the output was not finite")
    cancelled: int = Field(0, description="running when the buffer closed")
    retried: int = Field(0, description="attempts handed out again after a crash or an error")
    budget: int = 0
    external_done: int = 0
    external_failed: int = 0


class SampleCounts(_Part):
    produced: int = 0
    produced_actors: int = 0
    produced_external: int = 0
    received: int = 0
    duplicates: int = Field(0, description="dropped as already received (a re-run simulation)")
    consumed: int = 0
    produced_per_s: float = 0.0
    consumed_per_s: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _by_source(cls, data: Any) -> Any:
        # Snapshots written before samples were counted by source: all came from the solver actors.
        if isinstance(data, dict) and "produced_actors" not in data and "produced_external" not in data:
            return {**data, "produced_actors": data.get("produced", 0)}
        return data


class BufferFigures(_Part):
    policy: str = "fifo"
    held: int = 0
    capacity: int = 0
    watermark_reached: bool = False
    evicted: int = 0
    restarts: int = Field(0, description="buffer shard processes that died and came back empty")


class TrainingFigures(_Part):
    step: int = 0
    steps: int = 0
    loss: float | None = None
    validation_error: float | None = None
    samples_seen: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    version: int | None = Field(None, description="newest model version the study published")
    history: list[tuple[int, float]] = Field(default_factory=list, description="(step, validation error)")
    restarts: int = Field(0, description="worker-group restarts from a checkpoint (and resumes)")
    resumed_at: list[int] = Field(default_factory=list, description="the step each restart went on from")


class SamplerFigures(_Part):
    kind: str = Field("uniform", description="sampler.kind of the study")
    losses_observed: int = Field(0, description="per-simulation training losses an adaptive sampler learnt from")
    bred_fraction: float | None = Field(None, description="breed: the fraction of the next draws bred")
    scored: int = Field(0, description="uncertainty: simulations placed where the ensemble disagreed most")
    scorer_version: int | None = Field(None, description="uncertainty: the model version scoring the draws")
    queried: int = Field(0, description="queries: simulations drawn near parameter points users asked about")
    query_points: int = Field(0, description="queries: the queried points the sampler draws near now")


class StudySnapshot(_Part):
    id: str
    name: str
    model_name: str
    state: StudyState
    error: str | None = None
    device: str = "cpu"
    started_at: float | None = None
    updated_at: float = 0.0
    nodes: Nodes = Field(default_factory=Nodes)
    elapsed_s: float = 0.0
    simulations: SimulationCounts = Field(default_factory=SimulationCounts)
    samples: SampleCounts = Field(default_factory=SampleCounts)
    buffer: BufferFigures = Field(default_factory=BufferFigures)
    training: TrainingFigures = Field(default_factory=TrainingFigures)
    sampler: SamplerFigures = Field(default_factory=SamplerFigures)
    ingest: dict[str, Any] | None = Field(None, description="the gRPC ingest of external solvers, when enabled")

    @classmethod
    def pending(
        cls, study_id: str, config: StudyConfig, state: StudyState | str, error: str | None = None
    ) -> StudySnapshot:
        """A study whose driver has not reported yet (or never will)."""
        return cls(
            id=study_id,
            name=config.name,
            model_name=config.served_name,
            state=StudyState(state),
            error=error,
            device="gpu" if config.training.use_gpu else "cpu",
            updated_at=time.time(),
            simulations=SimulationCounts(budget=config.simulations),
            buffer=BufferFigures(policy=config.buffer.policy, capacity=config.buffer.capacity),
            training=TrainingFigures(steps=config.training.steps),
            sampler=SamplerFigures(kind=config.sampler.kind),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the state as its string)."""
        return self.model_dump(mode="json")
