"""A study that the cluster can never place fails in seconds with a message naming what is missing."""

from __future__ import annotations

import time

import pytest

from services.config import parse_config
from services.study import ResourcesError, Study, check_resources

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

BASE = {"problem": {"config": {"n": 16, "steps": 10, "dt": 0.01}}, "simulations": 8}


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (
            {"training": {"workers": 8, "use_gpu": True}},
            "8 GPUs (training.workers: 8 with use_gpu), the Ray cluster has 0",
        ),
        ({"solvers": {"actors": 6}}, "7 CPUs (6 solver actors x 1 + 1 trainer workers), the Ray cluster has 4"),
    ],
)
def test_a_study_the_cluster_cannot_place_fails_fast_naming_the_cause(tmp_path, over, needle) -> None:
    t0 = time.monotonic()
    study = Study(parse_config({**BASE, **over}), tmp_path).start()
    assert study.join(60), "the study hung instead of failing"
    snap = study.snapshot()
    assert snap["state"] == "failed" and needle in snap["error"], snap["error"]
    assert time.monotonic() - t0 < 30
    study.release()


def test_what_fits_passes_the_check() -> None:
    check_resources(parse_config({**BASE, "solvers": {"actors": 3}}), {"CPU": 4.0})
    check_resources(parse_config({**BASE, "training": {"workers": 2, "use_gpu": True}}), {"CPU": 4.0, "GPU": 2.0})
    with pytest.raises(ResourcesError, match=r"2 GPUs .* the Ray cluster has 1$"):
        check_resources(parse_config({**BASE, "training": {"workers": 2, "use_gpu": True}}), {"CPU": 4.0, "GPU": 1.0})
    # The buffer's samples must fit in the object store: by samples at this problem's size, or capacity_mb.
    big = parse_config({**BASE, "buffer": {"capacity": 100_000}})  # 16x16 heat2d: 4 x (7 + 256) bytes a sample
    with pytest.raises(ResourcesError, match=r"100 MB of object store for the buffer .* the Ray cluster has 50 MB"):
        check_resources(big, {"CPU": 4.0, "object_store_memory": 50 * 2**20})
    bounded = parse_config({**BASE, "buffer": {"capacity": 100_000, "capacity_mb": 40}})
    check_resources(bounded, {"CPU": 4.0, "object_store_memory": 50 * 2**20})
    # An offline study runs no solver actors (checked on the validated config, before the dataset is read).
    offline = parse_config({**BASE, "solvers": {"actors": 8}}).model_copy(update={"dataset": "d.zarr"})
    check_resources(offline, {"CPU": 1.0})


def test_with_an_autoscaler_the_study_waits_a_bounded_time_for_resources(tmp_path) -> None:
    cfg = {**BASE, "training": {"workers": 8, "use_gpu": True}, "resources_timeout_s": 3}
    study = Study(parse_config(cfg), tmp_path).start()
    assert study.join(60), "the study hung instead of failing"
    snap = study.snapshot()
    assert snap["state"] == "failed", snap
    assert "8 GPUs" in snap["error"] and "after waiting resources_timeout_s = 3 s" in snap["error"]
    study.release()


def test_the_wait_ends_as_soon_as_the_cluster_has_grown(monkeypatch) -> None:
    import threading

    import services.study as study_mod

    sizes = iter([{"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 2.0}])
    seen = []

    def grow() -> dict[str, float]:
        seen.append(1)
        return next(sizes)

    monkeypatch.setattr(study_mod.ray, "cluster_resources", grow)
    cfg = parse_config({**BASE, "training": {"workers": 2, "use_gpu": True}, "resources_timeout_s": 60})
    study_mod.wait_for_resources(cfg, threading.Event(), poll_s=0.01)
    assert len(seen) == 3  # two refusals, then the cluster fits
