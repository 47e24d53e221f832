"""External clients the ingest tests run in separate processes (``python tests/ingest/_client.py MODE ...``).

* ``stall``: take one simulation, send the first half of its chunks, print ``STALLED <id>`` and wait to be killed.
* ``fast``: ``--threads`` threads stream simulations of constant fields as fast as the server lets them,
  until the study needs no more; print one JSON line ``{"done", "samples", "credit_wait_s", "ids"}``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from services.ingest.client import connect


def chunks(sim):
    for field, steps in sim.required.items():
        for k in steps:
            yield field, k, np.full(sim.grid, 100.0 + k, dtype=np.float32)


def stall(client, study_id: str) -> None:
    sim = client.next_simulation(study_id)
    todo = list(chunks(sim))
    for field, k, a in todo[: len(todo) // 2]:
        sim.send(field, k, a)
    print(f"STALLED {sim.id}", flush=True)
    time.sleep(600)


def fast(client, study_id: str, threads: int) -> None:
    lock = threading.Lock()
    totals = {"done": 0, "samples": 0, "credit_wait_s": 0.0, "ids": []}

    def work() -> None:
        while True:  # until the study needs no more
            sim = client.next_simulation(study_id, wait_s=60)
            if sim is None:
                return
            for field, k, a in chunks(sim):
                sim.send(field, k, a)
            n = sim.finish()
            with lock:
                totals["done"] += 1
                totals["samples"] += n
                totals["credit_wait_s"] += sim.credit_wait_s
                totals["ids"].append(sim.id)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps(totals), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["stall", "fast"])
    ap.add_argument("address")
    ap.add_argument("token")
    ap.add_argument("study_id")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    with connect(args.address, args.token) as client:
        if args.mode == "stall":
            stall(client, args.study_id)
        else:
            fast(client, args.study_id, args.threads)


if __name__ == "__main__":
    main()
