"""A real ``surge serve`` process for end-to-end tests: started on a free loopback port, stopped after."""

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
