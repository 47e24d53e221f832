"""The model store: ``<root>/<name>/<version>/{weights.safetensors, card.json}``.

A version directory is written under a temporary name and renamed into place,
so a reader never sees a half-written checkpoint. Weights are safetensors,
never pickle; the card carries everything needed to rebuild the model.

``<root>/<name>/served.json`` is the name's served alias: the version a gateway serves. It moves
when a newly published version is no worse on the same validation set (``offer``), or on an
explicit ``promote``; so a new study under an existing name does not replace a finished model
with its first, barely trained checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.card import ModelCard
from trainer.ensemble import build_ensemble
from trainer.problem import ProblemSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = re.compile(r"^\d{6}$")


SERVED = "served.json"  # the served alias of a name: {"version": N, "reason": ..., "at": ...}
STALE_TMP_S = 3600.0  # a publisher's temporary directory older than this was left by one that died


def _clean_stale(d: Path) -> None:
    """Remove ``.tmp-*`` directories that publishers killed mid-write left behind."""
    now = time.time()
    for p in d.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:  # another publisher removed it meanwhile
            pass


class StoreError(RuntimeError):
    """A checkpoint is missing, foreign or corrupt."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    card: ModelCard  # parsed once, when the version is loaded
    model: torch.nn.Module

    @property
    def spec(self) -> ProblemSpec:
        return self.card.problem

    @property
    def normaliser(self) -> Any:
        return self.card.normaliser

    @cached_property
    def values_per_row(self) -> int:
        """Output values of one predicted row (``prod(output_shape)``), twice that for an ensemble (mean, std)."""
        return int(np.prod(self.spec.out_shape)) * (2 if self.card.members else 1)

    @property
    def members(self) -> int:
        """Ensemble members (0: a single model)."""
        return self.card.members


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} must match {_NAME.pattern}")
    return name


class ModelStore:
    """A directory of named, versioned model checkpoints."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name) and self.versions(p.name)
        )

    def versions(self, name: str) -> list[int]:
        if not _NAME.match(name):  # never let a name reach outside the store ("..", "a/b")
            return []
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if _VERSION.match(p.name) and (p / "card.json").is_file())

    def latest(self, name: str) -> int | None:
        v = self.versions(name)
        return v[-1] if v else None

    def publish(self, name: str, model: torch.nn.Module, card: dict[str, Any] | ModelCard) -> int:
        """Write a new version of ``name``; returns its number."""
        check_name(name)
        # A card nobody could read back is refused before anything is written (CardError).
        card = card.to_dict() if isinstance(card, ModelCard) else ModelCard.from_dict(card).to_dict()
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
        }
        _clean_stale(d)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d))
        # mkdtemp makes it 0700: a gateway running under another uid (a container sharing the
        # volume) could not read the version once it is renamed into place.
        os.chmod(tmp, 0o755)
        try:
            save_file(tensors, str(tmp / "weights.safetensors"))
            os.chmod(tmp / "weights.safetensors", 0o644)  # safetensors writes it 0600
            # Two writers may race for a number: mkdir-free rename fails on an existing target, then retry.
            for _ in range(100):
                version = (self.latest(name) or 0) + 1
                full = {**card, "name": name, "version": version, "created_at": time.time()}
                (tmp / "card.json").write_text(json.dumps(full, indent=2, sort_keys=True))
                os.chmod(tmp / "card.json", 0o644)  # whatever the publisher's umask
                try:
                    os.rename(tmp, d / f"{version:06d}")
                except OSError:
                    continue
                self.offer(name, version)
                return version
            raise StoreError(f"could not publish a new version of {name!r}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def card(self, name: str, version: int | None = None) -> ModelCard:
        """The parsed card of a version (the newest without one); ``StoreError`` if unreadable or malformed."""
        if not _NAME.match(name):
            raise StoreError(f"no model named {name!r}")
        version = self.latest(name) if version is None else version
        if version is None:
            raise StoreError(f"no model named {name!r}")
        path = self.root / name / f"{version:06d}" / "card.json"
        try:
            return ModelCard.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:  # CardError is a ValueError
            raise StoreError(f"cannot read the card of {name!r} version {version}: {e}") from None

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Rebuild a model from its card and load its weights (no pickle anywhere)."""
        if not _NAME.match(name):
            raise StoreError(f"no model named {name!r}")
        version = self.latest(name) if version is None else version
        if version is None:
            raise StoreError(f"no model named {name!r}")
        card = self.card(name, version)
        try:
            a = card.architecture
            model = build_ensemble(
                max(1, card.members), a.name, a.in_channels, a.out_channels, a.grid, field_input=a.field_input, **a.arch
            )
            state = load_file(str(self.root / name / f"{version:06d}" / "weights.safetensors"))
        except Exception as e:  # safetensors, torch and a bad card each raise their own types
            raise StoreError(f"cannot rebuild {name!r} version {version}: {e}") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise StoreError(f"weights of {name!r} version {version} do not fit its card: {e}") from None
        # neuraloperator keeps a non-tensor `_metadata` entry in its state dict; it is not a weight.
        missing = [k for k in missing if not k.endswith("_metadata")]
        if missing or unexpected:
            raise StoreError(f"weights of {name!r} version {version} do not fit its card: {missing or unexpected}")
        model.eval()
        return LoadedModel(name=name, version=version, card=card, model=model)

    # The served alias ------------------------------------------------------------------------------

    def served(self, name: str) -> int | None:
        """The version the name's served alias points at (``<name>/served.json``), if it still exists.

        ``None`` for a name without an alias (a store written before there was one): readers then
        serve the newest version."""
        if not _NAME.match(name):
            return None
        try:
            v = int(json.loads((self.root / name / SERVED).read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return v if (self.root / name / f"{v:06d}" / "card.json").is_file() else None

    def serving(self, name: str) -> int | None:
        """The version a reader serves: the served alias, or the newest version in a store without one."""
        return self.served(name) or self.latest(name)

    def offer(self, name: str, version: int) -> bool:
        """Point the served alias at a just-published ``version`` if it is no worse than the served one.

        Comparable only on the same validation set (the card's ``validation_set`` fingerprint) and
        with a measured error: a version of a study validated on other simulations, or not validated
        yet, moves the alias only by an explicit ``promote``. A name without a served version gets
        this one. Returns whether the alias moved."""
        with self._lock(name):
            cur = self.served(name)
            if cur is not None and cur != version:
                try:
                    new = self.card(name, version)
                except StoreError:  # never point the alias at a version whose card cannot be read
                    return False
                try:
                    old: ModelCard | None = self.card(name, cur)
                except StoreError:  # the served card is unreadable: anything readable is better
                    old = None
                err = new.training.validation_error
                if err is None or (old is not None and not new.comparable(old)):
                    return False
                cur_err = old.training.validation_error if old is not None else None
                if cur_err is not None and err > cur_err:
                    return False
            self._write_served(name, version, "validation" if cur is not None else "first")
            return True

    def promote(self, name: str, version: int) -> int | None:
        """Point the served alias at ``version`` whatever its error; returns the version served before."""
        if version not in self.versions(name):
            raise StoreError(f"model {name!r} has no version {version}")
        with self._lock(name):
            before = self.served(name)
            self._write_served(name, version, "promoted")
        return before

    def _write_served(self, name: str, version: int, reason: str) -> None:
        d = self.root / name
        tmp = d / f".{SERVED}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"version": version, "reason": reason, "at": time.time()}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, d / SERVED)  # readers see the old alias or the new one, never half of one

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Serialise alias changes of one name across processes (publishers on several nodes, the gateway)."""
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def prune(self, name: str, keep: int, study_id: str | None = None) -> None:
        """Delete all but the newest ``keep`` versions (of ``study_id``'s only, when given).

        Never the served version, and never another study's: two studies on one name do not
        delete each other's versions. Readers holding a loaded model are unaffected."""
        served = self.served(name)
        mine = []
        for v in self.versions(name):
            if study_id is not None:
                try:
                    if self.card(name, v).training.study_id != study_id:
                        continue
                except StoreError:
                    continue
            mine.append(v)
        for v in mine[:-keep]:
            if v != served:
                shutil.rmtree(self.root / name / f"{v:06d}", ignore_errors=True)
