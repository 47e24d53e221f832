"""Surrogate models, one registry, one constructor shape ``(in_channels, out_channels, grid, **arch)``.

Every model maps inputs to fields ``[B, out_channels, *grid]``. Inputs are vectors
``[B, in_channels]`` for a parametric problem, fields ``[B, in_channels, *grid]`` for an
operator problem (``field_input=True``, supplied by the trainer from the problem spec, like
the channels and the grid; the architecture keys are the rest).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """Melissa's surrogate: a fully connected network ``(params, t) -> u(t)`` on the whole grid."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        field_input: bool = False,
        hidden: int = 256,
        layers: int = 3,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"mlp.activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if layers < 1 or hidden < 1:
            raise ValueError("mlp.layers and mlp.hidden must be >= 1")
        self.out_shape = (out_channels, *grid)
        in_dim = in_channels * math.prod(grid) if field_input else in_channels
        dims = [in_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            blocks += [nn.Linear(a, b), _ACTIVATIONS[activation]()]
        blocks.append(nn.Linear(dims[-1], math.prod(self.out_shape)))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F) or (B, F, *grid), flattened either way
        return self.net(x.flatten(1)).view(x.shape[0], *self.out_shape)  # (B, C, *grid)


class FNO(nn.Module):
    """neuraloperator's FNO; the parameters and time enter as constant input channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        field_input: bool = False,
        modes: int = 12,
        width: int = 32,
        layers: int = 4,
    ) -> None:
        super().__init__()
        from neuralop.models import FNO as _FNO  # heavy import, only when an FNO is built

        self.grid = tuple(grid)
        self.field_input = field_input
        n_modes = tuple(min(modes, g // 2) for g in self.grid)
        self.net = _FNO(
            n_modes=n_modes, in_channels=in_channels, out_channels=out_channels, hidden_channels=width, n_layers=layers
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.field_input:
            # x: (B, F) -> constant channels (B, F, *grid); the FNO adds its own grid coordinates.
            x = x.view(*x.shape, *([1] * len(self.grid))).expand(*x.shape, *self.grid)
        return self.net(x)  # (B, F, *grid) -> (B, C, *grid)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "fno": FNO}


def available() -> list[str]:
    return sorted(MODELS)


def check_arch(name: str, arch: dict[str, Any]) -> None:
    """Reject unknown model names and architecture keys before anything is built."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    params = inspect.signature(MODELS[name].__init__).parameters
    allowed = [k for k in params if k not in ("self", "in_channels", "out_channels", "grid", "field_input")]
    unknown = sorted(set(arch) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} setting(s) {unknown}; allowed: {allowed}")


def build_model(
    name: str, in_channels: int, out_channels: int, grid: tuple[int, ...], field_input: bool = False, **arch: Any
) -> nn.Module:
    """Build a registered model; unknown names or architecture keys raise ``ValueError``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    try:
        return MODELS[name](in_channels, out_channels, tuple(grid), field_input=field_input, **arch)
    except TypeError as e:
        raise ValueError(f"bad architecture for model {name!r}: {e}") from None
