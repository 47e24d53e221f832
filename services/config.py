"""Study configuration: YAML validated once at the edge by pydantic.

An invalid config raises ``ConfigError`` with one message per problem, each naming
the field (``training.batch_size``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import solvers
from solvers.base import ParamSpace
from trainer.models import available as model_names
from trainer.models import check_arch
from trainer.problem import ProblemSpec

# The example studies: beside the packages in a checkout, or where the image puts them.
CONFIG_DIR = Path(os.environ.get("SURGE_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
DEFAULT_CONFIG = CONFIG_DIR / "heat2d-mlp.yaml"


class ConfigError(ValueError):
    """A study config that cannot run; the message names the offending field(s)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProblemConfig(_Strict):
    solver: str = "heat2d"
    config: dict[str, Any] = Field(default_factory=dict)
    kind: Literal["parametric", "operator"] = "parametric"
    inputs: list[str] = Field(default_factory=list, description="operator: input fields")
    outputs: list[str] = Field(default_factory=list, description="fields to predict (default: all non-inputs)")
    input_index: int = Field(0, description="operator: recorded step of the inputs")
    output_index: int = Field(-1, description="operator: recorded step of the outputs (pairs: final)")
    pairs: Literal["final", "next"] = Field("final", description="operator: input->output once, or every step")
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="narrow the sampled box of some parameters (inside the solver's bounds)"
    )

    @model_validator(mode="after")
    def _solver_config(self) -> ProblemConfig:
        cls = solvers.config_class(self.solver)  # a ValueError naming what is available
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(self.config) - known)
        if unknown:
            raise ValueError(f"unknown {self.solver} setting(s) {unknown}; allowed: {sorted(known)}")
        try:
            cls(**self.config)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
        self.spec()  # kind, fields, indices and bounds must fit the solver
        return self

    def spec(self) -> ProblemSpec:
        """The problem spec this config describes (validated against the solver)."""
        solver = solvers.get(self.solver, **self.config)
        space = solver.params
        unknown = sorted(set(self.bounds) - set(space.names))
        if unknown:
            raise ValueError(f"bounds: unknown parameter(s) {unknown}; {self.solver} has {list(space.names)}")
        low, high = list(space.low), list(space.high)
        for name, (lo, hi) in self.bounds.items():
            j = space.names.index(name)
            if not (space.low[j] <= lo < hi <= space.high[j]):
                raise ValueError(
                    f"bounds.{name}: [{lo}, {hi}] must be a non-empty interval inside [{space.low[j]}, {space.high[j]}]"
                )
            low[j], high[j] = lo, hi
        spec = ProblemSpec.from_solver(
            solver,
            dict(self.config),
            kind=self.kind,
            inputs=tuple(self.inputs),
            outputs=tuple(self.outputs),
            input_index=self.input_index,
            output_index=self.output_index,
            pairs=self.pairs,
        )
        return dataclasses.replace(spec, params=ParamSpace(space.names, tuple(low), tuple(high)))


class BreedConfig(_Strict):
    """Melissa's breed sampler; ``sigma``, ``start``, ``end``, ``breakpoint`` and ``use_true_mixing`` are
    Melissa's names and defaults (its active-sampling parameters), ``max_retries`` and ``history`` ours."""

    sigma: float = Field(
        0.005, gt=0, le=1, description="std of the Gaussian mutation, as a fraction of each parameter's range"
    )
    start: float = Field(0.15, ge=0, le=1, description="bred fraction of the draws once the first losses arrive")
    end: float = Field(0.75, ge=0, le=1, description="bred fraction reached after `breakpoint` simulations")
    breakpoint: int = Field(100, ge=1, description="simulations drawn over which the bred fraction ramps")
    use_true_mixing: bool = Field(
        False, description="exactly round(fraction * n) of n points bred (else each point with that probability)"
    )
    max_retries: int = Field(10, ge=0, le=1000, description="re-mutations of a child outside the box")
    history: int = Field(1000, ge=1, le=1_000_000, description="recent simulations parents are picked from")

    @model_validator(mode="after")
    def _ramp(self) -> BreedConfig:
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must not exceed end ({self.end})")
        return self


class UncertaintyConfig(_Strict):
    """Draws where the study's latest published ensemble disagrees most (``services.sampling.UncertaintySampler``)."""

    fraction: float = Field(0.5, ge=0, le=1, description="share of each draw picked by the ensemble's disagreement")
    pool: int = Field(512, ge=1, le=1_000_000, description="uniform candidate points scored per draw (at least 4x)")
    diversity: float = Field(
        0.05, ge=0, le=2, description="least distance between picked points, in the unit cube of the parameters"
    )
    mix: Literal["uniform", "breed"] = Field("uniform", description="where the other points come from")
    refresh_s: float = Field(10.0, gt=0, le=3600, description="how often the study loads the newest ensemble")


class QueriesConfig(_Strict):
    """Draws near the parameter points users asked the gateway about (``services.queries.QuerySampler``)."""

    fraction: float = Field(0.5, ge=0, le=1, description="share of each draw taken near queried points")
    jitter: float = Field(
        0.01, ge=0, le=1, description="Gaussian jitter of a queried point, as a fraction of each parameter's range"
    )
    refresh_s: float = Field(10.0, gt=0, le=3600, description="how often the study reads the queried points")


class SamplerConfig(_Strict):
    kind: Literal["uniform", "sobol", "breed", "uncertainty", "queries"] = "uniform"
    seed: int = Field(0, ge=0)
    breed: BreedConfig | None = Field(None, description="settings of kind 'breed' (defaults: Melissa's)")
    uncertainty: UncertaintyConfig | None = Field(None, description="settings of kind 'uncertainty'")
    queries: QueriesConfig | None = Field(None, description="settings of kind 'queries'")

    @model_validator(mode="after")
    def _settings_of_kind(self) -> SamplerConfig:
        if self.breed is not None and not self.breeds:
            raise ValueError(
                f"sampler.breed is set but sampler.kind is {self.kind!r}: set kind: breed (or uncertainty with "
                "uncertainty.mix: breed), or drop it"
            )
        if self.uncertainty is not None and self.kind != "uncertainty":
            raise ValueError(
                f"sampler.uncertainty is set but sampler.kind is {self.kind!r}: set kind: uncertainty, or drop it"
            )
        if self.queries is not None and self.kind != "queries":
            raise ValueError(f"sampler.queries is set but sampler.kind is {self.kind!r}: set kind: queries, or drop it")
        return self

    @property
    def breeds(self) -> bool:
        """Whether some draws are bred (kind breed, or an uncertainty sampler mixing with breed)."""
        return self.kind == "breed" or (self.kind == "uncertainty" and self.uncertainty_settings().mix == "breed")

    @property
    def adaptive(self) -> bool:
        """Whether draws depend on what training reports."""
        return self.kind in ("breed", "uncertainty", "queries")

    def uncertainty_settings(self) -> UncertaintyConfig:
        return self.uncertainty or UncertaintyConfig()

    def queries_settings(self) -> QueriesConfig:
        return self.queries or QueriesConfig()

    def breed_settings(self) -> dict[str, Any]:
        return (self.breed or BreedConfig()).model_dump()


class SolverActorsConfig(_Strict):
    actors: int = Field(1, ge=0, le=256, description="solver actors (0: only external solvers feed the study)")
    sims_per_call: int = Field(8, ge=1, le=4096, description="simulations solved together in one batched call")
    chunk_steps: int = Field(10, ge=1, description="recorded steps gathered into one chunk sent to the buffer")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per solver actor")
    max_attempts: int = Field(
        3, ge=1, le=100, description="attempts per simulation (a crashed or raising solver) before it is given up"
    )
    max_failure_fraction: float = Field(
        0.25, ge=0, le=1, description="the study stops with an error once more of its simulations than this fail"
    )


class BufferConfig(_Strict):
    policy: Literal["fifo", "firo", "reservoir"] = "fifo"
    capacity: int = Field(20_000, ge=1)
    watermark: int = Field(2_000, ge=0)
    capacity_mb: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _watermark(self) -> BufferConfig:
        if self.watermark > self.capacity:
            raise ValueError(f"watermark ({self.watermark}) must not exceed capacity ({self.capacity})")
        return self


class TrainingConfig(_Strict):
    model: str = "mlp"
    arch: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, ge=1, le=65_536)
    steps: int = Field(2_000, ge=1)
    lr: float = Field(1e-3, gt=0, le=1.0)
    warmup: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    validate_every: int = Field(200, ge=1, description="validate and publish a checkpoint every K steps")
    validation_simulations: int = Field(16, ge=1, le=10_000)
    validation_seed: int = Field(1_000_003, ge=0)
    validation_dataset: str | None = Field(
        None, description="a zarr dataset (surge dataset build) to validate on instead of validation_simulations"
    )
    keep_versions: int = Field(5, ge=1)
    max_failures: int = Field(
        2, ge=0, description="trainer worker failures survived; each restarts every rank from the last checkpoint"
    )
    checkpoints_kept: int = Field(2, ge=1, description="training checkpoints kept for resuming (one per validation)")
    stop_grace_s: float = Field(
        60.0, gt=0, le=3600, description="a stop (DELETE, SIGTERM) waits this long for the last checkpoint"
    )
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: Ray's CPU share)")
    ensemble: int = Field(
        1,
        ge=1,
        le=32,
        description="members of a deep ensemble trained together on the stream (1: a single model); predictions "
        "then carry a calibrated standard deviation",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in model_names():
            raise ValueError(f"unknown model {v!r}; available: {', '.join(model_names())}")
        return v

    loss: Literal["rel_l2", "mse"] = Field("rel_l2", description="relative L2 per sample (the FNO paper's) or MSE")
    schedule: Literal["cosine", "step"] = Field("cosine", description="cosine decay, or a factor every N steps")
    decay_every: int = Field(1000, ge=1, description="schedule: step — steps between learning-rate decays")
    decay_gamma: float = Field(0.5, gt=0, le=1, description="schedule: step — factor applied at each decay")
    norm_steps: int = Field(100, ge=1, description="steps whose batches set the running normalisation statistics")

    @model_validator(mode="after")
    def _arch(self) -> TrainingConfig:
        check_arch(self.model, self.arch)
        return self


class IngestConfig(_Strict):
    """The gRPC server through which external solvers feed the study (``services/ingest``)."""

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(50051, ge=0, le=65_535, description="port to listen on (0: any free port)")
    max_message_mb: float = Field(64.0, gt=0, le=2047, description="largest gRPC message, e.g. one field chunk")
    max_staged_mb: float = Field(
        1024.0, gt=0, description="server memory for simulations staged until complete, over all streams"
    )
    max_simulations: int | None = Field(None, ge=1, description="external simulations at most (default: no limit)")
    lease_s: float = Field(
        600.0, gt=0, description="a simulation handed out but not streamed for this long is handed out again"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_attempts" in data:
            raise ValueError("ingest.max_attempts has moved to solvers.max_attempts (one limit for every solver)")
        return data


class StudyConfig(_Strict):
    name: str = Field("study", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    problem: ProblemConfig = Field(default_factory=ProblemConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    simulations: int = Field(10_000, ge=1, description="fresh simulations at most; the study ends with training")
    solvers: SolverActorsConfig = Field(default_factory=SolverActorsConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    resources_timeout_s: float = Field(
        0.0,
        ge=0,
        le=86_400,
        description="with an autoscaler: wait this long for the CPUs/GPUs the study needs (0: fail at once)",
    )

    dataset: str | None = Field(
        None, description="offline: a zarr dataset (surge dataset build) the trainer cycles over instead of a stream"
    )

    @model_validator(mode="after")
    def _fed(self) -> StudyConfig:
        kind = self.sampler.kind
        if self.sampler.adaptive:
            if self.problem.spec().params.dim == 0:
                raise ValueError(
                    f"sampler.kind: {kind} moves parameter points, and solver {self.problem.solver!r} has no "
                    "scalar parameters (its inputs are random fields): use uniform"
                )
            if self.dataset is not None:
                raise ValueError(f"sampler.kind: {kind} steers the simulations a study runs; a dataset study runs none")
        if kind == "uncertainty":
            if self.training.ensemble < 2:
                raise ValueError(
                    "sampler.kind: uncertainty draws where an ensemble's members disagree: set training.ensemble "
                    f"to 2 or more (it is {self.training.ensemble})"
                )
            if self.problem.spec().field_input:
                raise ValueError(
                    "sampler.kind: uncertainty scores parameter points with the model, and this problem's model "
                    "takes input fields: use breed or uniform"
                )
        if self.training.validation_dataset is not None:
            from trainer.dataset import Dataset, DatasetError

            try:
                Dataset(self.training.validation_dataset).check_compatible(self.problem.spec())
            except DatasetError as e:
                raise ValueError(f"training.validation_dataset: {e}") from None
        if self.dataset is not None:
            if self.ingest.enabled:
                raise ValueError("dataset: a study reads a dataset or takes a stream, not both (ingest is enabled)")
            from trainer.dataset import Dataset, DatasetError

            try:
                ds = Dataset(self.dataset)
                ds.check_compatible(self.problem.spec())
            except DatasetError as e:
                raise ValueError(f"dataset: {e}") from None
            if len(ds) < self.training.batch_size:
                # Epochs hold whole batches only: a smaller dataset could never yield one.
                raise ValueError(
                    f"dataset: {self.dataset} holds {len(ds)} samples, fewer than one batch "
                    f"(training.batch_size = {self.training.batch_size})"
                )
            return self
        if self.solvers.actors == 0 and not self.ingest.enabled:
            raise ValueError("solvers.actors is 0 and ingest is not enabled: nothing would feed the study")
        return self

    @property
    def served_name(self) -> str:
        """The model-store name the study publishes under (defaults to the solver's name)."""
        return self.model_name or self.problem.solver


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return f"invalid study config ({source}): " + "; ".join(lines)


def parse_config(data: Any, source: str = "<config>") -> StudyConfig:
    """Validate a mapping (parsed YAML/JSON) into a ``StudyConfig``."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid study config ({source}): expected a mapping at the top level")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def parse_yaml(text: str, source: str = "<config>") -> StudyConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid study config ({source}): not valid YAML: {e}") from None
    return parse_config(data if data is not None else {}, source)


def load_config(path: str | Path) -> StudyConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read study config {p}: {e.strerror}") from None
    return parse_yaml(text, str(p))
