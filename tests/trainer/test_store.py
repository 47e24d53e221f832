"""The model store: versions, atomic publication, self-describing checkpoints, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import solvers
from trainer.card import CardError, ModelCard
from trainer.loop import LoopStats, Normaliser, make_card
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore, StoreError

ARCH = {"hidden": 8, "layers": 1}
SOLVER = {"n": 4, "steps": 4, "dt": 0.01}
SPEC = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER), SOLVER)
CARD = make_card(
    problem=SPEC.to_dict(),
    model_name="mlp",
    arch=ARCH,
    in_channels=SPEC.in_features,
    out_channels=1,
    grid=SPEC.grid,
    norm=Normaliser(300.0, 100.0),
    stats=LoopStats(step=3, samples_seen=96, validation_error=0.25),
    study_id="s0",
)


def _model() -> torch.nn.Module:
    return build_model("mlp", SPEC.in_features, 1, SPEC.grid, **ARCH)


def test_versions_increase_and_latest_is_served(tmp_path) -> None:
    store = ModelStore(tmp_path)
    assert store.latest("a") is None
    assert [store.publish("a", _model(), CARD) for _ in range(3)] == [1, 2, 3]
    assert store.latest("a") == 3
    assert store.names() == ["a"]
    card = store.card("a")
    assert card.version == 3 and card.name == "a" and card.created_at > 0


def test_the_card_is_parsed_once_into_types_and_round_trips(tmp_path) -> None:
    store = ModelStore(tmp_path)
    store.publish("a", _model(), CARD)
    card = store.card("a")
    assert isinstance(card, ModelCard)
    assert card.problem == SPEC and card.architecture.name == "mlp" and card.architecture.grid == SPEC.grid
    assert card.input_shape == (SPEC.in_features,) and card.output_shape == (1, *SPEC.grid)
    assert card.normaliser == Normaliser(300.0, 100.0)
    assert card.training.train_steps == 3 and card.training.samples_seen == 96
    assert card.training.validation_error == 0.25 and card.training.study_id == "s0"
    stored = json.loads((tmp_path / "a" / "000001" / "card.json").read_text())
    assert card.to_dict() == stored
    assert store.load("a").spec == card.problem


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: c.pop("normalisation"), "no 'normalisation' entry"),
        (lambda c: c["model"].pop("grid"), "no 'grid' entry"),
        (lambda c: c.update(output_shape="wide"), "malformed"),
        (lambda c: c.update(format="pickle"), "never pickle"),
    ],
)
def test_a_malformed_card_is_refused_when_published_and_when_read(tmp_path, change, needle: str) -> None:
    bad = json.loads(json.dumps(CARD))
    change(bad)
    store = ModelStore(tmp_path)
    with pytest.raises(CardError, match=needle):
        store.publish("a", _model(), bad)
    assert store.versions("a") == []  # nothing half-published
    store.publish("a", _model(), CARD)
    (tmp_path / "a" / "000001" / "card.json").write_text(json.dumps(bad))  # written by something else
    with pytest.raises(StoreError, match=needle):
        store.load("a")


def test_files_are_safetensors_and_json(tmp_path) -> None:
    store = ModelStore(tmp_path)
    store.publish("a", _model(), CARD)
    d = tmp_path / "a" / "000001"
    assert sorted(p.name for p in d.iterdir()) == ["card.json", "weights.safetensors"]
    json.loads((d / "card.json").read_text())
    # No leftovers of the temporary directory used for atomic publication; the served alias and its lock.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".lock", "000001", "served.json"]


def _card(err: float | None, study: str = "s1", vset: str | None = "val-1") -> dict:
    return {**CARD, "validation_error": err, "study_id": study, "validation_set": vset}


def test_prune_keeps_newest_and_never_the_served_version(tmp_path) -> None:
    store = ModelStore(tmp_path)
    for err in (0.1, 0.2, 0.3, 0.4, 0.5):  # each worse than the first: version 1 stays served
        store.publish("a", _model(), _card(err))
    assert store.served("a") == 1
    store.prune("a", keep=2, study_id="s1")
    assert store.versions("a") == [1, 4, 5]


def test_the_served_alias_moves_only_to_a_version_no_worse_on_the_same_validation_set(tmp_path) -> None:
    store = ModelStore(tmp_path)
    assert store.served("a") is None
    assert store.publish("a", _model(), _card(0.5)) == 1 and store.served("a") == 1  # the first is served
    store.publish("a", _model(), _card(0.3))
    assert store.served("a") == 2  # better
    store.publish("a", _model(), _card(0.4))
    assert store.served("a") == 2  # worse: published, listed, not served
    store.publish("a", _model(), _card(None))
    assert store.served("a") == 2  # not validated yet
    # A re-run of the study under the same name: its first, barely trained checkpoint is not served.
    store.publish("a", _model(), _card(0.9, study="s2"))
    assert store.served("a") == 2
    store.publish("a", _model(), _card(0.2, study="s2"))
    assert store.served("a") == 6  # it beat the served one on the same simulations
    # Validated on other simulations: not comparable, served only when promoted.
    store.publish("a", _model(), _card(0.01, study="s3", vset="val-2"))
    assert store.served("a") == 6
    assert store.promote("a", 7) == 6 and store.served("a") == 7
    assert store.promote("a", 3) == 7 and store.served("a") == 3  # back to any version, explicitly
    with pytest.raises(StoreError, match="no version 99"):
        store.promote("a", 99)


def test_two_studies_on_one_name_do_not_prune_each_others_versions(tmp_path) -> None:
    store = ModelStore(tmp_path)
    for i in range(4):  # interleaved, as two studies publishing at once
        store.publish("a", _model(), _card(0.5 - 0.01 * i, study="s1"))
        store.prune("a", keep=2, study_id="s1")
        store.publish("a", _model(), _card(0.6, study="s2"))
        store.prune("a", keep=2, study_id="s2")
    by_study = {v: store.card("a", v).training.study_id for v in store.versions("a")}
    assert sorted(v for v, s in by_study.items() if s == "s1") == [5, 7]
    assert sorted(v for v, s in by_study.items() if s == "s2") == [6, 8]
    assert store.served("a") == 7  # s1's best


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
