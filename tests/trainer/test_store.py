"""The model store: versions, atomic publication, self-describing checkpoints, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.models import build_model
from trainer.store import ModelStore, StoreError

ARCH = {"hidden": 8, "layers": 1}
CARD = {"model": {"name": "mlp", "arch": ARCH, "in_channels": 3, "out_channels": 1, "grid": [4, 4]}, "problem": {}}


def _model() -> torch.nn.Module:
    return build_model("mlp", 3, 1, (4, 4), **ARCH)


def test_versions_increase_and_latest_is_served(tmp_path) -> None:
    store = ModelStore(tmp_path)
    assert store.latest("a") is None
    assert [store.publish("a", _model(), CARD) for _ in range(3)] == [1, 2, 3]
    assert store.latest("a") == 3
    assert store.names() == ["a"]
    card = store.card("a")
    assert card["version"] == 3 and card["name"] == "a" and card["created_at"] > 0


def test_files_are_safetensors_and_json(tmp_path) -> None:
    store = ModelStore(tmp_path)
    store.publish("a", _model(), CARD)
    d = tmp_path / "a" / "000001"
    assert sorted(p.name for p in d.iterdir()) == ["card.json", "weights.safetensors"]
    json.loads((d / "card.json").read_text())
    # No leftovers of the temporary directory used for atomic publication.
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["000001"]


def test_prune_keeps_newest(tmp_path) -> None:
    store = ModelStore(tmp_path)
    for _ in range(5):
        store.publish("a", _model(), CARD)
    store.prune("a", keep=2)
    assert store.versions("a") == [4, 5]


def test_corrupt_and_foreign_checkpoints_raise_store_error(tmp_path) -> None:
    store = ModelStore(tmp_path)
    store.publish("a", _model(), CARD)
    (tmp_path / "a" / "000001" / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StoreError, match="cannot rebuild 'a' version 1"):
        store.load("a")
    other = {**CARD, "model": {**CARD["model"], "arch": {"hidden": 16, "layers": 1}}}
    store.publish("b", _model(), other)  # weights of an 8-wide net under a card that says 16
    with pytest.raises(StoreError):
        store.load("b")
    with pytest.raises(StoreError, match="no model named 'zzz'"):
        store.load("zzz")


def test_bad_names_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="model name"):
        ModelStore(tmp_path).publish("../evil", _model(), CARD)


def test_published_versions_are_readable_by_other_users(tmp_path) -> None:
    # A gateway running under another uid (a container sharing the volume) must read them.
    import stat

    store = ModelStore(tmp_path)
    store.publish("a", _model(), CARD)
    d = tmp_path / "a" / "000001"
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o004 for f in d.iterdir())


def test_temporary_directories_of_dead_publishers_are_removed(tmp_path) -> None:
    import os
    import time

    from trainer.store import STALE_TMP_S

    store = ModelStore(tmp_path)
    store.publish("a", _model(), CARD)
    old, fresh = tmp_path / "a" / ".tmp-dead", tmp_path / "a" / ".tmp-writing"
    for d in (old, fresh):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"partial")
    past = time.time() - STALE_TMP_S - 60
    os.utime(old, (past, past))
    assert store.publish("a", _model(), CARD) == 2
    assert not old.exists()  # left by a publisher killed mid-write
    assert fresh.exists()  # may be another publisher at work
    assert store.versions("a") == [1, 2]
