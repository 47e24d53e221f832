"""A real ``surge serve`` process at its limits: bounded memory, an event loop that stays free.

Three requests at once at every limit (the most rows, the most output values, JSON and .npy),
against a model whose rows are large (a 64 x 64 field each, so the output limit binds before the
row limit). The gateway's peak resident memory (``VmHWM`` of its process) must stay under 1.5 GB,
and ``/healthz`` must keep answering while the predictions run (an event loop busy serialising
JSON answered it after 21.9 s, when Kubernetes' liveness probe gives up after 5 s).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.e2e.serve import peak_rss, publish_mlp, surge_serve

SOLVER_CFG = {"n": 64, "steps": 10, "dt": 0.001}
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
MAX_VALUES = 2**22  # the default limit
PER_ROW = 64 * 64
ROWS = MAX_VALUES // PER_ROW  # 1024 rows: the most one answer may hold
PEAK_LIMIT_BYTES = 1.5 * 2**30


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("limits") / "store"
    publish_mlp(root, "big", SOLVER_CFG, {"hidden": 64, "layers": 2})
    with surge_serve(root) as served:
        yield served


def test_three_requests_at_every_limit_keep_memory_bounded_and_healthz_answering(gateway) -> None:
    url, pid = gateway
    times = list(np.linspace(0.0, 0.01, ROWS))
    rows = np.array([[*PARAMS.values(), t] for t in times])
    buf = io.BytesIO()
    np.save(buf, rows)
    npy_body = buf.getvalue()
    stop = threading.Event()
    health: list[tuple[int, float]] = []

    def probe() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.get(f"{url}/healthz")
                health.append((r.status_code, time.perf_counter() - t0))
                time.sleep(0.02)

    def json_request(_: int) -> tuple[int, int]:
        r = httpx.post(f"{url}/v1/models/big/predict", json={"params": PARAMS, "times": times}, timeout=120)
        return r.status_code, len(r.content)

    def npy_request(_: int) -> tuple[int, int]:
        r = httpx.post(
            f"{url}/v1/models/big/predict",
            content=npy_body,
            headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
            timeout=120,
        )
        return r.status_code, len(r.content)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        with ThreadPoolExecutor(3) as ex:
            for _ in range(2):
                answers = list(ex.map(json_request, range(3))) + list(ex.map(npy_request, range(3)))
                assert [code for code, _ in answers] == [200] * 6, answers
                assert all(size >= ROWS * PER_ROW * 4 for _, size in answers)  # whole answers, not cut
            # One row more than the limit is refused, not computed.
            r = httpx.post(f"{url}/v1/models/big/predict", json={"params": PARAMS, "times": [*times, 0.0]})
            assert r.status_code == 413 and f"at most {ROWS} rows" in r.json()["detail"]
    finally:
        stop.set()
        prober.join(30)
    peak = peak_rss(pid)
    worst = max(s for _, s in health)
    print(f"peak RSS {peak / 2**20:.0f} MiB; /healthz {len(health)} probes, slowest {worst * 1e3:.0f} ms")
    assert peak < PEAK_LIMIT_BYTES, f"gateway peak RSS {peak / 2**20:.0f} MiB"
    assert health and all(code == 200 for code, _ in health)
    # Loose on purpose (a shared 2-core machine): an event loop held by predictions took seconds.
    assert worst < 2.0, f"/healthz took {worst:.2f} s while predictions ran"
