"""Load with hot swaps: 50 concurrent clients for 60 s against a real ``surge serve`` while a new
version is published every 5 s. Every request must succeed (200) and answer with the version it
names; p50/p99 latency and the gateway's peak memory are printed.

The gateway is given a queue that holds every client (``SURGE_PREDICT_QUEUE``): with the default
(16 waiting), 50 clients at once would be shed with 503, which is the intended answer to overload
and is tested in ``tests/services/test_gateway.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.serve import peak_rss, publish_mlp, surge_serve

CLIENTS = 50
DURATION_S = 60.0
PUBLISH_EVERY_S = 5.0
SOLVER_CFG = {"n": 16, "steps": 10, "dt": 0.005}
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}

pytestmark = pytest.mark.slow


def _publish(root: Path, k: int) -> int:
    # Each version better than the one before: each is served.
    return publish_mlp(root, "heat2d", SOLVER_CFG, {"hidden": 32, "layers": 2}, seed=k, validation_error=1 / (k + 1))


def test_fifty_clients_for_a_minute_while_versions_are_published_every_five_seconds(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _publish(root, 0)
    with surge_serve(root, SURGE_PREDICT_QUEUE=str(CLIENTS)) as (url, pid):
        stop = threading.Event()
        published = [1]

        def publisher() -> None:
            k = 1
            while not stop.wait(PUBLISH_EVERY_S):
                published.append(_publish(root, k))
                k += 1

        results: list[tuple[int, float, int]] = []  # (status, seconds, version)

        async def client(i: int, http: httpx.AsyncClient, end: float) -> None:
            body = {"params": PARAMS | {"u0": 250.0 + i}, "times": [0.0, 0.02]}
            while time.monotonic() < end:
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/models/heat2d/predict", json=body)
                ok = r.status_code == 200 and r.json()["version"] == int(r.headers["X-Model-Version"])
                results.append(
                    (
                        r.status_code if ok else -r.status_code,
                        time.perf_counter() - t0,
                        int(r.headers.get("X-Model-Version", -1)),
                    )
                )

        async def run() -> None:
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            async with httpx.AsyncClient(timeout=30, limits=limits) as http:
                end = time.monotonic() + DURATION_S
                await asyncio.gather(*(client(i, http, end) for i in range(CLIENTS)))

        pub = threading.Thread(target=publisher, daemon=True)
        pub.start()
        try:
            asyncio.run(run())
        finally:
            stop.set()
            pub.join(30)
        peak = peak_rss(pid)
    codes = [c for c, _, _ in results]
    lat = np.array([s for _, s, _ in results])
    versions = sorted({v for _, _, v in results})
    print(
        f"{len(results)} requests, {len(results) / DURATION_S:.0f}/s; p50 {np.percentile(lat, 50) * 1e3:.1f} ms, "
        f"p99 {np.percentile(lat, 99) * 1e3:.1f} ms; versions served {versions[0]}..{versions[-1]} "
        f"({len(versions)}) of {len(published)} published; gateway peak RSS {peak / 2**20:.0f} MiB"
    )
    failed = [c for c in codes if c != 200]
    assert not failed, f"{len(failed)} of {len(codes)} requests failed: {sorted(set(failed))}"
    assert len(published) >= DURATION_S / PUBLISH_EVERY_S - 2  # the swaps did happen during the load
    assert len(versions) >= len(published) - 2  # and were served while it ran
