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
