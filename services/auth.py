"""Bearer tokens, one check for REST and gRPC, and where tokens come from.

Three scopes, each its own token: ``SURGE_API_TOKEN`` (admin: studies, model promotion),
``SURGE_INGEST_TOKEN`` (external solvers: gRPC Ingest and Study), ``SURGE_PREDICT_TOKEN``
(optional: predictions, REST and gRPC, are open without it). A token is read from the variable
itself or, so that it need not sit in an environment a job API or a dashboard shows, from the
file named by ``<NAME>_FILE`` (a mounted Kubernetes Secret, a compose secret).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

ADMIN, INGEST, PREDICT = "SURGE_API_TOKEN", "SURGE_INGEST_TOKEN", "SURGE_PREDICT_TOKEN"
TOKEN_MISSING = "missing or invalid bearer token"


class SecretError(ValueError):
    """A token file named in the environment that cannot be read."""


def secret(name: str) -> str | None:
    """``$name``, else the stripped content of the file ``$name_FILE``; ``None`` when neither is set or empty."""
    if v := os.environ.get(name, "").strip():
        return v
    path = os.environ.get(f"{name}_FILE", "").strip()
    if not path:
        return None
    try:
        v = Path(path).read_text().strip()
    except OSError as e:
        raise SecretError(f"{name}_FILE={path}: cannot read the token file: {e.strerror or e}") from None
    if not v:
        raise SecretError(f"{name}_FILE={path}: the token file is empty")
    return v


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an ``authorization`` header value is ``Bearer <token>`` (compared in constant time)."""
    scheme, _, given = str(authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


__all__ = ["ADMIN", "INGEST", "PREDICT", "TOKEN_MISSING", "SecretError", "bearer_ok", "secret"]
