"""``Reject``: how every part of the ingest server ends a call, with a gRPC status and a message saying why."""

from __future__ import annotations

import grpc


class Reject(Exception):
    """Ends a call with a gRPC status and a message saying what is wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
