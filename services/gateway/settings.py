"""Gateway settings: one validated object, read from the environment (``SURGE_*``)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services import auth
from services.ingest import tls


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's cpuset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_predict_workers() -> int:
    return max(1, min(4, _cores()))


class GatewaySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    store: Path = Field(Path("models"), description="model store directory")
    api_token: str | None = Field(
        None, description="admin bearer token: studies and model promotion; unset disables them"
    )
    ingest_token: str | None = Field(
        None, description="bearer token of external solvers (gRPC Ingest and Study); unset disables ingest"
    )
    predict_token: str | None = Field(None, description="bearer token for predictions; unset: predictions are open")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="requests above this size get 413")
    max_predict_rows: int = Field(4096, ge=1, description="most (params, t) rows in one predict request")
    # 4 Mi float32 outputs: 16 MB as .npy, about 50 MB as JSON. With the default workers and queue
    # (each admitted request may also hold a body), the worst case stays well inside the Helm
    # chart's 2 GiB memory limit.
    max_predict_values: int = Field(
        2**22, ge=1, description="most output values (rows x values per row) in one predict answer"
    )
    predict_workers: int = Field(
        default_factory=default_predict_workers, ge=1, description="predictions computed at once (threads)"
    )
    predict_queue: int = Field(16, ge=0, description="predictions waiting for a worker; more are answered 503")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: the cores shared among the predict workers)"
    )
    poll_interval_s: float = Field(1.0, gt=0, description="how often the model store is checked for new versions")
    max_fallbacks: int = Field(
        4, ge=0, le=256, description="predict?fallback=solve solves in flight at once; more are answered 503 (0: off)"
    )
    fallback_timeout_s: float = Field(
        60.0, gt=0, le=600, description="how long a predict fallback waits for the solver before answering 504"
    )
    query_sample: int = Field(
        1024,
        ge=0,
        le=100_000,
        description="points asked of each model kept (a uniform sample) for sampler.kind: queries; 0: off",
    )
    query_flush_s: float = Field(
        5.0, gt=0, le=3600, description="how often the kept query points are merged into the model store"
    )
    max_running_studies: int = Field(2, ge=1)
    ray_jobs_address: str | None = Field(
        None, description="Ray job API (http://head:8265): studies run there as Ray jobs"
    )
    grpc_tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) of the gRPC port; with grpc_tls_key, the port speaks TLS"
    )
    grpc_tls_key: Path | None = Field(None, description="PEM private key of grpc_tls_cert")

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        tls.require_pair(self.grpc_tls_cert, self.grpc_tls_key)
        return self

    def grpc_tls(self) -> tls.ServerTLS | None:
        """The gRPC port's certificate and key, read and checked; None: plaintext."""
        if self.grpc_tls_cert is None or self.grpc_tls_key is None:
            return None
        return tls.ServerTLS.load(self.grpc_tls_cert, self.grpc_tls_key)

    def intra_op_threads(self) -> int:
        return self.torch_threads or max(1, _cores() // self.predict_workers)

    @classmethod
    def from_env(cls, **overrides: object) -> GatewaySettings:
        env: dict[str, object] = {}
        if v := os.environ.get("SURGE_STORE"):
            env["store"] = Path(v)
        for key, name in (("api_token", auth.ADMIN), ("ingest_token", auth.INGEST), ("predict_token", auth.PREDICT)):
            if v := auth.secret(name):
                env[key] = v
        for key in (
            "max_body_bytes",
            "max_predict_rows",
            "max_predict_values",
            "predict_workers",
            "predict_queue",
            "torch_threads",
            "max_fallbacks",
            "fallback_timeout_s",
            "query_sample",
            "query_flush_s",
        ):
            if v := os.environ.get(f"SURGE_{key.upper()}"):
                env[key] = v  # validated (and refused with the variable's meaning) by the model
        if v := os.environ.get("SURGE_RAY_JOBS_ADDRESS"):
            env["ray_jobs_address"] = v
        # Read and checked now (a half pair, an unreadable or mismatched file: a TLSError naming it), so that
        # a bad setting stops the gateway at start, not when its gRPC port opens.
        if pair := tls.ServerTLS.from_env():
            env["grpc_tls_cert"], env["grpc_tls_key"] = Path(pair.cert_path), Path(pair.key_path)
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)
