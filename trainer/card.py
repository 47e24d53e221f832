"""The model card, typed: what a checkpoint is (problem, architecture, normaliser) and how it was trained.

``card.json`` beside the weights is the stored form (DESIGN: model store); ``ModelCard.from_dict``
parses and checks it once, when a version is read, so that serving code reads attributes instead of
dictionary keys and never parses the problem spec again per request. ``to_dict`` gives the stored
form back, with any keys this version of Surge does not know kept as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.ensemble import Calibration
from trainer.loop import Normaliser
from trainer.problem import ProblemSpec

_KNOWN = {
    "problem",
    "model",
    "input_shape",
    "output_shape",
    "normalisation",
    "samples_seen",
    "train_steps",
    "train_loss",
    "validation_error",
    "validation_set",
    "study_id",
    "format",
    "name",
    "version",
    "created_at",
    "ensemble",
}


class CardError(ValueError):
    """A card that is not a model card: missing or ill-typed entries."""


@dataclass(frozen=True)
class Architecture:
    """What ``trainer.models.build_model`` needs to rebuild the network."""

    name: str
    arch: dict[str, Any]  # the architecture's own keyword arguments (hidden, layers, modes, ...)
    in_channels: int
    out_channels: int
    grid: tuple[int, ...]
    field_input: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": dict(self.arch),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "grid": list(self.grid),
            "field_input": self.field_input,
        }


@dataclass(frozen=True)
class TrainingFacts:
    """How the version was trained and how good it was when published."""

    samples_seen: int = 0
    train_steps: int = 0
    train_loss: float | None = None
    validation_error: float | None = None  # mean relative L2 on the study's validation set; None: not measured
    validation_set: str | None = None  # fingerprint of that set: errors compare only on the same one
    study_id: str | None = None


@dataclass(frozen=True)
class ModelCard:
    problem: ProblemSpec
    architecture: Architecture
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    normaliser: Normaliser
    training: TrainingFacts
    name: str | None = None  # these three are set by the store when the version is published
    version: int | None = None
    created_at: float = 0.0
    format: str = "safetensors"
    ensemble: Calibration | None = None  # an ensemble's members and calibration; None: a single model
    problem_dict: dict[str, Any] = field(default_factory=dict, repr=False)  # as stored (shown by the gateway)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys written by a newer Surge

    @classmethod
    def from_dict(cls, d: Any) -> ModelCard:
        """Parse a stored card; ``CardError`` naming what is wrong."""
        if not isinstance(d, dict):
            raise CardError(f"a model card is a JSON object, not {type(d).__name__}")
        try:
            m = d["model"]
            arch = Architecture(
                name=str(m["name"]),
                arch=dict(m["arch"]),
                in_channels=int(m["in_channels"]),
                out_channels=int(m["out_channels"]),
                grid=tuple(int(g) for g in m["grid"]),
                field_input=bool(m.get("field_input", False)),
            )
            problem = ProblemSpec.from_dict(d["problem"])
            card = cls(
                problem=problem,
                architecture=arch,
                input_shape=tuple(int(s) for s in d["input_shape"]),
                output_shape=tuple(int(s) for s in d["output_shape"]),
                normaliser=Normaliser.from_dict(d["normalisation"]),
                training=TrainingFacts(
                    samples_seen=int(d.get("samples_seen") or 0),
                    train_steps=int(d.get("train_steps") or 0),
                    train_loss=_float_or_none(d.get("train_loss")),
                    validation_error=_float_or_none(d.get("validation_error")),
                    validation_set=_str_or_none(d.get("validation_set")),
                    study_id=_str_or_none(d.get("study_id")),
                ),
                name=_str_or_none(d.get("name")),
                version=int(d["version"]) if d.get("version") is not None else None,
                created_at=float(d.get("created_at") or 0.0),
                format=str(d.get("format", "safetensors")),
                ensemble=Calibration.from_dict(d["ensemble"]) if d.get("ensemble") is not None else None,
                problem_dict=dict(d["problem"]),
                extra={k: v for k, v in d.items() if k not in _KNOWN},
            )
        except KeyError as e:
            raise CardError(f"the model card has no {e.args[0]!r} entry") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise CardError(f"the model card is malformed: {type(e).__name__}: {e}") from None
        if card.format != "safetensors":
            raise CardError(f"weights in format {card.format!r}; only safetensors is read (never pickle)")
        return card

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``card.json``)."""
        t = self.training
        d: dict[str, Any] = {
            **self.extra,
            "problem": self.problem_dict or self.problem.to_dict(),
            "model": self.architecture.to_dict(),
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "normalisation": self.normaliser.to_dict(),
            "samples_seen": t.samples_seen,
            "train_steps": t.train_steps,
            "train_loss": t.train_loss,
            "validation_error": t.validation_error,
            "validation_set": t.validation_set,
            "study_id": t.study_id,
            "format": self.format,
        }
        if self.ensemble is not None:
            d["ensemble"] = self.ensemble.to_dict()
        if self.name is not None:
            d.update(name=self.name, version=self.version, created_at=self.created_at)
        return d

    @property
    def members(self) -> int:
        """Ensemble members (0: a single model)."""
        return self.ensemble.members if self.ensemble is not None else 0

    def comparable(self, other: ModelCard) -> bool:
        """Whether the two versions' validation errors measure the same thing (same validation set)."""
        return self.training.validation_set == other.training.validation_set


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


__all__ = ["Architecture", "CardError", "ModelCard", "TrainingFacts"]
