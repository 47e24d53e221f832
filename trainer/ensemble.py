"""Deep ensembles: K members trained together on one stream, their spread as the uncertainty.

Members differ by their initialisation (built one after another from one seeded generator) and by
the samples they weigh: every step gives each member independent Poisson(1) weights over the batch,
Oza and Russell's online bagging (2001), the streaming form of a bootstrap. A stream is seen once, so
this is how K members get "different batch orders" from a single read of the buffer.

The spread of the members underestimates the error of their mean on data they were not trained on
(small K, shared stream); the served standard deviation is therefore the spread times ``std_scale``,
fitted on one half of the held-out validation simulations so that 68.27 % of their errors fall within
1 sigma (quantile recalibration, Kuleshov et al. 2018), and the card reports the coverage measured on
the other half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.models import build_model

ONE_SIGMA = 0.6826894921370859  # P(|Z| <= 1), Z standard normal
TWO_SIGMA = 0.9544997361036416  # P(|Z| <= 2)

# Histogram of log10(|error| / spread) over 12 decades, 0.005 decade per bin (1.2 % in the ratio):
# additive, so ranks' histograms add up and the quantile of every rank's ratios needs one all-reduce.
_LOG_LO, _LOG_HI, _BINS = -6.0, 6.0, 2400


class Ensemble(nn.Module):
    """``members`` applied to the same input: ``[B, ...] -> [K, B, C, *grid]``."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def size(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])  # (K, B, C, *grid)


def build_ensemble(
    k: int,
    name: str,
    in_channels: int,
    out_channels: int,
    grid: tuple[int, ...],
    field_input: bool = False,
    **arch: Any,
) -> nn.Module:
    """``k`` members of one architecture (``k == 1``: the plain model); each draws its own initial weights
    from torch's generator, so seed it first for reproducible members."""
    if k < 1:
        raise ValueError(f"ensemble size must be >= 1, got {k}")
    if k == 1:
        return build_model(name, in_channels, out_channels, grid, field_input=field_input, **arch)
    return Ensemble(
        [build_model(name, in_channels, out_channels, grid, field_input=field_input, **arch) for _ in range(k)]
    )


def members_of(model: nn.Module) -> int:
    """The ensemble size of ``model`` (unwrapping DistributedDataParallel); 0 for a plain model."""
    inner = getattr(model, "module", model)
    return inner.size if isinstance(inner, Ensemble) else 0


def bagging_weights(k: int, b: int, device: torch.device | None = None) -> torch.Tensor:
    """Online-bagging weights ``[k, b]``: independent Poisson(1) counts from torch's generator (saved with
    a training checkpoint, so a resumed run draws the same ones)."""
    return torch.poisson(torch.ones(k, b, device=device))


def bagged_loss(each: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's weighted mean loss; ``each`` and ``weights`` are ``[K, B]``.

    Members share no parameters, so summing leaves each member's gradient its own; a member whose weights
    are all 0 this step gets none."""
    return ((each * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)).sum()


def mean_std(preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' mean and spread (standard deviation over members, unbiased) of ``[K, ...]``."""
    return preds.mean(dim=0), preds.std(dim=0, correction=1)


@dataclass(frozen=True)
class Calibration:
    """How often the errors of the ensemble mean fall within 1 and 2 served standard deviations."""

    members: int
    std_scale: float  # served std = members' spread x std_scale
    within_1sigma: float | None  # on the held-out half not used to fit std_scale
    within_2sigma: float | None
    raw_within_1sigma: float | None  # the same with the bare spread (std_scale = 1)
    values: int  # output values the coverage was measured on

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "std_scale": self.std_scale,
            "within_1sigma": self.within_1sigma,
            "within_2sigma": self.within_2sigma,
            "raw_within_1sigma": self.raw_within_1sigma,
            "values": self.values,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        if not isinstance(d, dict):
            raise ValueError(f"ensemble must be an object, not {type(d).__name__}")
        k = int(d["members"])
        if k < 2:
            raise ValueError(f"ensemble.members must be >= 2, got {k}")
        scale = float(d.get("std_scale", 1.0))
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"ensemble.std_scale must be finite and > 0, got {scale}")

        def opt(key: str) -> float | None:
            v = d.get(key)
            return None if v is None else float(v)

        return cls(
            k, scale, opt("within_1sigma"), opt("within_2sigma"), opt("raw_within_1sigma"), int(d.get("values", 0))
        )


def ratio_histogram(err: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Counts of ``log10(|err| / spread)`` per value in fixed bins ``[_BINS + 2]`` (first and last: under
    and overflow; a zero spread with a non-zero error overflows, an exact zero error underflows)."""
    e = err.detach().abs().double().reshape(-1)
    s = spread.detach().double().reshape(-1)
    r = torch.log10(e) - torch.log10(s)  # -inf, +inf or nan (0/0) at the edges
    r = torch.nan_to_num(r, nan=-math.inf)  # 0/0: the members agree and are right
    idx = torch.floor((r - _LOG_LO) / (_LOG_HI - _LOG_LO) * _BINS).clamp(-1, _BINS) + 1
    return torch.bincount(idx.long(), minlength=_BINS + 2).double().cpu()


def _cdf_at(hist: torch.Tensor, log_ratio: float) -> float:
    """Fraction of the histogram's values with ``log10(ratio) <= log_ratio`` (to the bin)."""
    total = float(hist.sum())
    if total == 0:
        return math.nan
    # Bin j (1.._BINS) covers [lo + (j-1) w, lo + j w): bins 0..j lie at or below lo + j w.
    j = math.floor((log_ratio - _LOG_LO) / (_LOG_HI - _LOG_LO) * _BINS + 1e-9)
    return float(hist[: max(0, min(j, _BINS + 1)) + 1].sum()) / total


def _quantile(hist: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of the ratio (not its log) from the histogram: the upper edge of the bin reaching q."""
    c = torch.cumsum(hist, 0) / hist.sum()
    i = int(torch.searchsorted(c, torch.tensor(q, dtype=c.dtype)))
    if i == 0:
        return 10.0**_LOG_LO
    if i >= _BINS + 1:
        return math.inf
    return 10.0 ** (_LOG_LO + i * (_LOG_HI - _LOG_LO) / _BINS)  # bin i covers [lo+(i-1)w, lo+iw)


def calibrate(fit: torch.Tensor, check: torch.Tensor, members: int) -> Calibration:
    """``std_scale`` from the ratio histogram ``fit`` (its 68.27 % quantile), coverage from ``check``."""
    values = int(check.sum())
    if float(fit.sum()) == 0 or values == 0:
        return Calibration(members, 1.0, None, None, None, values)
    scale = _quantile(fit, ONE_SIGMA)
    if not math.isfinite(scale) or scale <= 0:  # the members (nearly) always agree: no usable spread
        scale = 1.0
    log_s = math.log10(scale)
    return Calibration(
        members,
        scale,
        _cdf_at(check, log_s),
        _cdf_at(check, log_s + math.log10(2.0)),
        _cdf_at(check, 0.0),
        values,
    )


def coverage(err: np.ndarray, std: np.ndarray, k: float = 1.0) -> float:
    """Fraction of values with ``|err| <= k * std`` (exactly, without the histogram)."""
    e, s = np.abs(np.asarray(err, np.float64)), np.asarray(std, np.float64)
    return float(np.mean(e <= k * s)) if e.size else math.nan


@torch.no_grad()
def ensemble_spread(
    model: nn.Module, x: torch.Tensor, norm: Any, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread ``[N, C, *grid]`` in physical units of an ensemble over encoded inputs ``x``."""
    model.eval()
    means, stds = [], []
    for i in range(0, x.shape[0], batch_size):
        preds = norm.decode(model(norm.encode_x(x[i : i + batch_size])))  # (K, b, C, *grid)
        m, s = mean_std(preds)
        means.append(m)
        stds.append(s)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def point_scores(
    model: nn.Module, norm: Any, spec: Any, params: np.ndarray, times: int = 4, batch_size: int = 1024
) -> np.ndarray:
    """How much the members disagree at each parameter point ``params [n, P]``: the relative spread
    ``||spread|| / ||mean||`` of the predicted fields, averaged over ``times`` recorded times after t = 0
    (relative, like the training loss: a point counts by its error relative to its own field)."""
    if spec.field_input:
        raise ValueError("uncertainty scores need a parametric problem (its inputs are parameters and time)")
    ts = np.asarray(spec.times[1:], dtype=np.float64)
    ts = ts[np.unique(np.linspace(0, len(ts) - 1, min(times, len(ts))).round().astype(int))]  # (T,)
    p = np.asarray(params, dtype=np.float64)
    n = p.shape[0]
    x = torch.from_numpy(spec.encode_inputs(np.repeat(p, len(ts), axis=0), np.tile(ts, n)))  # (n*T, P+2)
    mean, spread = ensemble_spread(model, x, norm, batch_size)  # (n*T, C, *grid)
    rel = spread.flatten(1).norm(dim=1) / mean.flatten(1).norm(dim=1).clamp_min(1e-12)  # (n*T,)
    return rel.view(n, len(ts)).mean(dim=1).double().numpy()


__all__ = [
    "ONE_SIGMA",
    "TWO_SIGMA",
    "Calibration",
    "Ensemble",
    "bagged_loss",
    "bagging_weights",
    "build_ensemble",
    "calibrate",
    "coverage",
    "ensemble_spread",
    "mean_std",
    "members_of",
    "point_scores",
    "ratio_histogram",
]
