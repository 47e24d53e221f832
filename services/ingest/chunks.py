"""What an external simulation must send: ``required_steps`` (the (field, time index) pairs a problem turns
into samples) and ``check_chunk`` (one chunk against the problem spec: field, time index, dtype, shape, size,
repeats, finite values). Pure functions of their arguments: no stream, pool or buffer state lives here."""

from __future__ import annotations

from collections.abc import Container

import grpc
import numpy as np

from services.ingest import surge_pb2 as pb
from services.ingest.errors import Reject
from trainer.problem import ProblemSpec

DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def required_steps(spec: ProblemSpec) -> dict[str, tuple[int, ...]]:
    """The time indices of each field that the problem turns into samples (what a client must send)."""
    every = tuple(range(len(spec.times)))
    if spec.kind == "parametric":
        return {f: every for f in spec.outputs}
    if spec.pairs == "next":
        return {f: every for f in spec.fields if f in spec.inputs or f in spec.outputs}
    need: dict[str, set[int]] = {}
    for f in spec.inputs:
        need.setdefault(f, set()).add(spec._in_k)
    for f in spec.outputs:
        need.setdefault(f, set()).add(spec._out_k)
    return {f: tuple(sorted(need[f])) for f in spec.fields if f in need}


def check_chunk(
    spec: ProblemSpec, chunk: pb.Chunk, data: bytes, sim_id: int, staged: Container[tuple[str, int]] = ()
) -> tuple[tuple[str, int], np.ndarray]:
    """``((field, time index), grid as float32)`` of a valid chunk, else ``Reject`` (INVALID_ARGUMENT) naming it.

    ``data`` is the chunk's bytes, read once (protobuf copies them at every access); ``staged`` the pairs
    the stream holds already, which may not come again."""
    name, k = chunk.field, int(chunk.time_index)
    where = f"simulation {sim_id}, chunk {name!r} at time_index {k}"
    if name not in spec.fields:
        raise Reject(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: unknown field {name!r}; {spec.solver} records {', '.join(spec.fields)}",
        )
    nt = len(spec.times)
    if not 0 <= k < nt:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: time_index must lie in [0, {nt - 1}]")
    dtype = DTYPES.get(chunk.dtype)
    if dtype is None:
        raise Reject(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: dtype {chunk.dtype!r} is not supported; send float32 or float64",
        )
    if tuple(chunk.shape) != spec.grid:
        raise Reject(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: shape {list(chunk.shape)} does not match the grid {list(spec.grid)}",
        )
    want = int(np.prod(spec.grid)) * dtype.itemsize
    if len(data) != want:
        raise Reject(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: data holds {len(data)} bytes; {list(spec.grid)} {chunk.dtype} takes {want}",
        )
    if (name, k) in staged:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: sent twice")
    a = np.frombuffer(data, dtype=dtype).reshape(spec.grid)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported below
        a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: holds non-finite values (NaN or inf)")
    return (name, k), a
