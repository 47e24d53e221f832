"""A real ``surge serve`` process for end-to-end tests (a free loopback port, stopped after), and the
untrained heat2d MLPs they serve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

import solvers
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

SERVE = "import sys; from services.cli import main; sys.exit(main())"  # `surge serve` with this interpreter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> int:
    """Peak resident memory (bytes) of a process so far (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def publish_mlp(
    root: Path, name: str, solver_cfg: dict, arch: dict, seed: int = 0, validation_error: float = 0.5
) -> int:
    """Publish an MLP of heat2d (weights fixed by ``seed``) as the next version of ``name``."""
    spec = ProblemSpec.from_solver(solvers.get("heat2d", **solver_cfg), solver_cfg)
    card = make_card(
        problem=spec.to_dict(),
        model_name="mlp",
        arch=arch,
        in_channels=spec.in_features,
        out_channels=1,
        grid=spec.grid,
        norm=Normaliser(300.0, 100.0),
        stats=LoopStats(step=seed, samples_seen=seed, validation_error=validation_error),
        study_id=name,
    )
    torch.manual_seed(seed)
    return ModelStore(root).publish(name, build_model("mlp", spec.in_features, 1, spec.grid, **arch), card)


@contextmanager
def surge_serve(store: Path, **env: str) -> Iterator[tuple[str, int]]:
    """``(url, pid)`` of a gateway serving ``store``; ``env`` adds ``SURGE_*`` settings."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SURGE_")} | env
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--store", str(store), "--host", "127.0.0.1", "--port", str(port)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "gateway exited"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
