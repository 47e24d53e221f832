"""Gateway settings: one validated object, read from the environment (``SURGE_*``)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class GatewaySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    store: Path = Field(Path("models"), description="model store directory")
    api_token: str | None = Field(None, description="bearer token for study mutations; unset disables them")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="requests above this size get 413")
    max_predict_rows: int = Field(4096, ge=1, description="most (params, t) rows in one predict request")
    poll_interval_s: float = Field(1.0, gt=0, description="how often the model store is checked for new versions")
    max_running_studies: int = Field(2, ge=1)
    ray_jobs_address: str | None = Field(
        None, description="Ray job API (http://head:8265): studies run there as Ray jobs"
    )

    @classmethod
    def from_env(cls, **overrides: object) -> GatewaySettings:
        env: dict[str, object] = {}
        if v := os.environ.get("SURGE_STORE"):
            env["store"] = Path(v)
        if v := os.environ.get("SURGE_API_TOKEN"):
            env["api_token"] = v
        if v := os.environ.get("SURGE_MAX_BODY_BYTES"):
            env["max_body_bytes"] = int(v)
        if v := os.environ.get("SURGE_MAX_PREDICT_ROWS"):
            env["max_predict_rows"] = int(v)
        if v := os.environ.get("SURGE_RAY_JOBS_ADDRESS"):
            env["ray_jobs_address"] = v
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)
