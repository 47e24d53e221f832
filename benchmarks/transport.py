"""Data-plane transport: samples/s from solver actors through a buffer shard into trainer batches.

The path is the study's own, with the solving and the training left out so that only moving the
samples is measured:

  producer actor (streaming generator: each chunk written once into the object store)
    -> forwarder thread in the driver (``forward_chunks``: only the reference goes to the shard)
    -> ``BufferShard`` (FIFO: slots point at rows of chunks)
    -> ``ShardBatches`` in the driver (zero-copy views, one copy into a preallocated batch).

A sample is a 16-parameter input and one float32 field (64², 256², 1000²: 16 KB to 4 MB), with 1 and
with 2 producers. ``np.copyto`` of a 256 MB array in the same run gives the machine's memory bandwidth;
``ratio_*`` is the transport's bytes/s over it (a sample is written once by the producer and copied
once into its batch, so 0.5 would be the bound of this design on one machine).

    python benchmarks/transport.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.actors import BufferShard
from services.dataplane import ShardBatches, chunk_keys, forward_chunks

PARAMS = 16
MELISSA_SAMPLES_PER_S = 150.0  # SC'23: 10⁶-value fields into 4 GPUs


@ray.remote(num_cpus=1)
class Producer:
    """Yields ``chunks`` chunks of ``rows`` samples of a ``grid``² field, as a solver's ``run`` does."""

    def __init__(self, grid: int, rows: int) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.random((rows, PARAMS), dtype=np.float32)
        self.y = rng.random((rows, grid * grid), dtype=np.float32)

    def run(self, first_sim: int, chunks: int) -> Any:
        rows = self.x.shape[0]
        for c in range(chunks):
            chunk = (self.x, self.y, np.full(rows, first_sim + c, dtype=np.int64), np.arange(rows, dtype=np.int64))
            yield (0, *chunk_keys(*chunk))  # the head a SolverActor yields: shard index and keys
            yield chunk


def memcpy_gbps(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    t0 = time.perf_counter()
    for _ in range(repeats):
        np.copyto(dst, src)
    return repeats * nbytes / (time.perf_counter() - t0) / 1e9


def _pass(actors: list[Any], grid: int, chunks: int, rows: int, batch: int, buffer_mb: int, first: int) -> float:
    """One pass of ``chunks`` chunks per producer through a fresh shard; samples/s."""
    sample_bytes = 4 * (PARAMS + grid * grid)
    capacity = max(4 * batch, min(8192, (buffer_mb * 2**20) // sample_bytes))
    shard = BufferShard.options(num_cpus=0).remote("fifo", capacity, batch, capacity_bytes=2 * capacity * sample_bytes)
    ray.get(shard.stats.remote())  # started before the clock runs
    producers = len(actors)

    def forward(a: int) -> None:
        gen = (
            actors[a]
            .run.options(num_returns="streaming", _generator_backpressure_num_objects=4)
            .remote(first + a * chunks, chunks)
        )
        for _ in forward_chunks(gen, [shard]):
            pass

    feed = ShardBatches(shard, batch, torch.device("cpu"), (PARAMS,), (1, grid, grid))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=forward, args=(a,), daemon=True) for a in range(producers)]
    for th in threads:
        th.start()
    closer = threading.Thread(target=lambda: ([th.join() for th in threads], ray.get(shard.close.remote())))
    closer.start()
    got = 0
    for b in feed:
        if b is None:
            break
        got += b[0].shape[0]
    dt = time.perf_counter() - t0
    closer.join()
    feed.close()
    ray.kill(shard)
    total = chunks * rows * producers
    if not total - batch < got <= total:  # FIFO: only the last partial batch may stay behind
        raise RuntimeError(f"{grid}²: {got} of {total} samples arrived")
    return got / dt


def measure(
    grid: int, producers: int, samples: int, rows: int, batch: int, buffer_mb: int = 256
) -> tuple[float, float]:
    """(samples/s, GB/s) in steady state, and samples/s of the first pass through fresh processes.

    The first pass of new processes through the object store pays the kernel's first touch of each
    page (in the store and in every process that maps it); a study's actors live for the whole
    study, so the steady state -- the median of three passes after that one -- is the figure.
    """
    actors = [Producer.remote(grid, rows) for _ in range(producers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    chunks = -(-samples // (rows * producers))
    cold = _pass(actors, grid, chunks, rows, batch, buffer_mb, 0)
    warm = [_pass(actors, grid, chunks, rows, batch, buffer_mb, (k + 1) * producers * chunks) for k in range(3)]
    for a in actors:
        ray.kill(a)
    sps = float(np.median(warm))
    return sps, sps * 4 * (PARAMS + grid * grid) / 1e9, cold


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples per case (about a minute)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line, last")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=max(2, cpus),
        object_store_memory=2 * 2**30,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    scale = 1 if args.quick else 4
    # (grid, samples per pass, rows per chunk, batch): chunks as a study puts them (8 sims x 10 steps;
    # 1 x 10 at 1000²), about 300 MB per pass in --quick.
    cases = [(64, 16000 * scale, 80, 64), (256, 1200 * scale, 80, 32), (1000, 160 * scale, 10, 16)]
    bw = memcpy_gbps()
    print(f"cpus: {cpus}; np.copyto: {bw:.2f} GB/s")
    print(
        f"{'field':>7} {'producers':>9} {'samples':>8} {'samples/s':>10} {'GB/s':>7} {'x memcpy':>9} {'first pass':>10}"
    )
    out: dict[str, Any] = {"memcpy_gbps": round(bw, 3), "cpus": cpus}
    for grid, samples, rows, batch in cases:
        for producers in (1, 2):
            sps, gbps, cold = measure(grid, producers, samples, rows, batch)
            print(f"{grid:>5}² {producers:>9} {samples:>8} {sps:>10.1f} {gbps:>7.3f} {gbps / bw:>9.3f} {cold:>10.1f}")
            suffix = "" if producers == 2 else "_1producer"
            out[f"samples_per_s_{grid}{suffix}"] = round(sps, 1)
            out[f"gbps_{grid}{suffix}"] = round(gbps, 3)
            out[f"ratio_{grid}{suffix}"] = round(gbps / bw, 4)
            out[f"samples_per_s_{grid}{suffix}_first_pass"] = round(cold, 1)
    out["samples_per_s_4mb"] = out["samples_per_s_1000"]
    out["transport_gbps"] = out["gbps_1000"]
    out["transport_ratio"] = out["ratio_1000"]
    print(
        f"1000² (4 MB samples): {out['samples_per_s_4mb']:.0f} samples/s, {out['transport_ratio']:.3f} x memcpy; "
        f"Melissa (SC'23) sustains about {MELISSA_SAMPLES_PER_S:.0f} samples/s of such fields"
    )
    ray.shutdown()
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
