"""Gateway speed: what serving over REST adds to the model, measured side by side in one run.

A ``surge serve`` process on loopback serves an MLP surrogate of heat2d (32 x 32 field per row).
In the same run and on the same machine:

- one-row JSON predict latency (keep-alive client) against the bare forward of one row
  (``run_model``: encoding, normalisation, forward, decoding) in this process;
  ``p50_overhead_ms`` is the difference of the medians;
- batched ``.npy`` requests of 256 rows, as many clients as the gateway has predict workers,
  against the bare model's rows/s on 256-row batches with all the cores; ``batched_ratio`` is
  rows/s over HTTP over bare rows/s;
- the client is a minimal keep-alive HTTP/1.1 client on a raw socket (as load generators such as
  wrk are: the client shares this machine's cores with the gateway, and a Python HTTP library
  spends more CPU per request than the server does). The same two figures through ``httpx``, what
  a Python program calling the gateway sees, are printed too (``httpx_*``);
- ``server_path_ratio``: the bare forward of a 256-row batch over the gateway's own work for that
  request (parsing, checks, forward, ``.npy`` answer) called in this process at the same threads,
  i.e. the share of ``batched_ratio`` lost to the server's code rather than to HTTP and a client
  sharing the cores;
- ``/healthz`` latency while the batched load runs (the event loop must stay free).

    python benchmarks/gateway.py [--quick] [--json]

``BENCH_SERVER_ENV='{"SURGE_PREDICT_WORKERS": "1"}'`` passes settings to the gateway measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import solvers
from services.gateway.hub import ModelHub, run_model
from services.gateway.routes.models import _answer
from services.gateway.settings import GatewaySettings, default_predict_workers
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

SOLVER_CFG = {"n": 32, "steps": 10, "dt": 0.001}
ARCH = {"hidden": 256, "layers": 3}
PARAMS = {"u0": 300.0, "t_left": 200.0, "t_right": 400.0, "t_bottom": 100.0, "t_top": 500.0}
BATCH = 256
# After a forward, torch's OpenMP threads in this process spin for a while (up to about 200 ms) before
# they sleep; the gateway measured meanwhile would share its cores with them.
SETTLE_S = 0.5
SERVER_ENV: dict[str, str] = json.loads(os.environ.get("BENCH_SERVER_ENV", "{}"))
NPY = "application/x-npy"
JSON = "application/json"
SERVE = "import sys; from services.cli import main; sys.exit(main())"


def _publish(root: Path) -> None:
    spec = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER_CFG), SOLVER_CFG)
    card = make_card(
        problem=spec.to_dict(),
        model_name="mlp",
        arch=ARCH,
        in_channels=spec.in_features,
        out_channels=1,
        grid=spec.grid,
        norm=Normaliser(300.0, 100.0),
        stats=LoopStats(step=1, samples_seen=1, validation_error=0.5),
        study_id="bench",
    )
    torch.manual_seed(0)
    ModelStore(root).publish("bench", build_model("mlp", spec.in_features, 1, spec.grid, **ARCH), card)


def _rows(n: int) -> np.ndarray:
    t = np.linspace(0.0, 0.01, n)
    return np.array([[*PARAMS.values(), ti] for ti in t])


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class RawClient:
    """One keep-alive HTTP/1.1 connection: sends prepared requests, reads answers into one buffer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(8 << 20)
        self.view = memoryview(self.buf)

    @staticmethod
    def request(path: str, body: bytes, ctype: str, accept: str) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {ctype}\r\naccept: {accept}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def call(self, req: bytes) -> memoryview:
        """Send ``req``; the answer's body (valid until the next call). Anything but 200 raises."""
        self.sock.sendall(req)
        n, end = 0, -1
        while end < 0:
            got = self.sock.recv_into(self.view[n:])
            if not got:
                raise ConnectionError("the gateway closed the connection")
            n += got
            end = self.buf.find(b"\r\n\r\n", 0, n)
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        if not head.startswith("http/1.1 200"):
            raise RuntimeError(f"gateway answered {head.splitlines()[0]}")
        length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:"))
        total = end + 4 + length
        if total > len(self.buf):
            raise RuntimeError(f"answer of {length} bytes exceeds the client's buffer")
        while n < total:
            n += self.sock.recv_into(self.view[n:total])
        return self.view[end + 4 : total]

    def close(self) -> None:
        self.sock.close()


def _start(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SURGE_")} | SERVER_ENV
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--store", str(root), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    args = ap.parse_args()
    rounds, n_single, n_batched = (3, 100, 24) if args.quick else (7, 200, 60)
    workers = default_predict_workers()
    settings = GatewaySettings(store=Path("unused"))
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        _publish(root)
        m = ModelStore(root).load("bench")
        one, batch = _rows(1), _rows(BATCH)
        buf = io.BytesIO()
        np.save(buf, batch)
        batch_body = buf.getvalue()
        path = "/v1/models/bench/predict"
        one_req = RawClient.request(path, json.dumps({"params": PARAMS, "times": [0.0]}).encode(), JSON, JSON)
        npy_req = RawClient.request(path, batch_body, NPY, NPY)

        def bare_batches(k: int) -> float:
            """The bare model's rows/s on 256-row batches with every core (the gateway's workers share them)."""
            torch.set_num_threads(cores)
            try:
                t0 = time.perf_counter()
                for _ in range(k):
                    run_model(m, batch)
                return k * BATCH / (time.perf_counter() - t0)
            finally:
                torch.set_num_threads(settings.intra_op_threads())  # one row: a gateway worker's threads

        def http_batches(port: int, k: int) -> float:
            def client(n: int) -> int:
                c = RawClient(port)
                try:
                    for _ in range(n):
                        c.call(npy_req)
                finally:
                    c.close()
                return n * BATCH

            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(client, [1] * workers))  # connections warm
                t0 = time.perf_counter()
                rows = sum(ex.map(client, [max(1, k // workers)] * workers))
            return rows / (time.perf_counter() - t0)

        torch.set_num_threads(settings.intra_op_threads())
        proc, url = _start(root)
        port = int(url.rsplit(":", 1)[1])
        bare_one: list[float] = []
        http_one: list[float] = []
        ratios: list[float] = []
        bare_rate: list[float] = []
        http_rate: list[float] = []
        try:
            raw = RawClient(port)
            for _ in range(20):
                raw.call(one_req)
                run_model(m, one)
            bare_batches(3)
            # Bare and HTTP alternate, round after round: a slow patch of this shared machine hits both.
            for _ in range(rounds):
                time.sleep(SETTLE_S)
                for _ in range(n_single):
                    t0 = time.perf_counter()
                    run_model(m, one)
                    bare_one.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    raw.call(one_req)
                    http_one.append(time.perf_counter() - t0)
                b = bare_batches(n_batched)
                time.sleep(SETTLE_S)
                h = http_batches(port, n_batched)
                bare_rate.append(b)
                http_rate.append(h)
                ratios.append(h / b)
            raw.close()

            # What a Python program using httpx sees (its client costs CPU on the same cores).
            with httpx.Client(timeout=60) as c:
                for _ in range(20):
                    c.post(f"{url}{path}", content=one_req.split(b"\r\n\r\n", 1)[1], headers={"content-type": JSON})
                httpx_one = []
                for _ in range(n_single):
                    t0 = time.perf_counter()
                    c.post(f"{url}{path}", content=one_req.split(b"\r\n\r\n", 1)[1], headers={"content-type": JSON})
                    httpx_one.append(time.perf_counter() - t0)

            def httpx_client(n: int) -> int:
                with httpx.Client(timeout=60) as bc:
                    for _ in range(n):
                        bc.post(
                            f"{url}{path}", content=batch_body, headers={"content-type": NPY, "accept": NPY}
                        ).raise_for_status()
                return n * BATCH

            with ThreadPoolExecutor(workers) as ex:
                t0 = time.perf_counter()
                rows = sum(ex.map(httpx_client, [max(1, n_batched // workers)] * workers))
                httpx_rows_s = rows / (time.perf_counter() - t0)
            httpx_ratio = httpx_rows_s / bare_batches(n_batched)

            # /healthz while the batched load runs: the event loop must stay free.
            stop = threading.Event()
            health: list[float] = []

            def probe() -> None:
                with httpx.Client(timeout=30) as hc:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        hc.get(f"{url}/healthz").raise_for_status()
                        health.append(time.perf_counter() - t0)
                        time.sleep(0.02)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            http_batches(port, 4 * n_batched)
            stop.set()
            prober.join(30)
        finally:
            proc.terminate()
            proc.wait(20)

        # The gateway's own work for one batched request (model lookup, .npy parsing, checks, forward,
        # .npy answer) against the bare forward at the same (one worker's) threads, in this process:
        # what the server's code adds without HTTP and without a client on the same cores.
        hub = ModelHub(root)
        answer_s, bare_s = [], []
        for _ in range(max(10, n_batched)):
            t0 = time.perf_counter()
            _answer(hub, "bench", None, batch_body, NPY, True, settings, ["bench"])
            answer_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_model(m, batch)
            bare_s.append(time.perf_counter() - t0)

    out = {
        "bare_one_row_p50_ms": round(_p(bare_one, 50) * 1e3, 3),
        "http_one_row_p50_ms": round(_p(http_one, 50) * 1e3, 3),
        "http_one_row_p99_ms": round(_p(http_one, 99) * 1e3, 3),
        "p50_overhead_ms": round((_p(http_one, 50) - _p(bare_one, 50)) * 1e3, 3),
        "bare_rows_per_s": round(float(np.median(bare_rate))),
        "http_npy_rows_per_s": round(float(np.median(http_rate))),
        "batched_ratio": round(float(np.median(ratios)), 3),
        "batched_ratio_min": round(min(ratios), 3),
        "httpx_one_row_p50_ms": round(_p(httpx_one, 50) * 1e3, 3),
        "httpx_p50_overhead_ms": round((_p(httpx_one, 50) - _p(bare_one, 50)) * 1e3, 3),
        "httpx_batched_ratio": round(httpx_ratio, 3),
        "server_path_ratio": round(_p(bare_s, 50) / _p(answer_s, 50), 3),
        "healthz_under_load_p99_ms": round(_p(health, 99) * 1e3, 1) if health else None,
        "predict_workers": workers,
        "torch_threads": settings.intra_op_threads(),
        "rounds": rounds,
        "batch_rows": BATCH,
        "values_per_row": int(np.prod(m.spec.out_shape)),
    }
    for k, v in out.items():
        print(f"{k:>28}: {v}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
