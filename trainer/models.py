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


def _as_field(x: torch.Tensor, grid: tuple[int, ...], field_input: bool) -> torch.Tensor:
    """Vector inputs ``(B, F)`` become constant channels ``(B, F, *grid)``; field inputs pass through."""
    if field_input:
        return x
    return x.view(*x.shape, *([1] * len(grid))).expand(*x.shape, *grid)


def _coords(grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Node coordinates in [0, 1], ``(len(grid), *grid)``."""
    axes = [torch.linspace(0.0, 1.0, g, device=device, dtype=dtype) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


class FNO(nn.Module):
    """neuraloperator's FNO; vector inputs (parameters, time) enter as constant input channels.

    ``factorization`` (e.g. ``"tucker"``) gives the tensorised FNO (TFNO) of Kossaifi et al.
    ``channel_mlp: false`` drops neuraloperator's per-layer channel MLP, leaving the FNO paper's
    layer (spectral convolution plus a pointwise linear skip), about 1.3-1.8x faster on a CPU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        field_input: bool = False,
        modes: int = 12,
        width: int = 32,
        layers: int = 4,
        factorization: str | None = None,
        rank: float = 1.0,
        channel_mlp: bool = True,
    ) -> None:
        super().__init__()
        from neuralop.models import FNO as _FNO  # heavy import, only when an FNO is built

        self.grid = tuple(grid)
        self.field_input = field_input
        n_modes = tuple(min(modes, g // 2) for g in self.grid)
        self.net = _FNO(
            n_modes=n_modes,
            in_channels=in_channels,
            out_channels=out_channels,
            hidden_channels=width,
            n_layers=layers,
            factorization=factorization,
            rank=rank,
            use_channel_mlp=bool(channel_mlp),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The FNO adds its own grid coordinates as channels.
        return self.net(_as_field(x, self.grid, self.field_input))  # (B, F, *grid) -> (B, C, *grid)


class TFNO(FNO):
    """The tensorised FNO: spectral weights in Tucker form with a fraction ``rank`` of the parameters."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        field_input: bool = False,
        modes: int = 12,
        width: int = 32,
        layers: int = 4,
        rank: float = 0.42,
        channel_mlp: bool = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, grid, field_input, modes, width, layers, "tucker", rank, channel_mlp
        )


class UNet(nn.Module):
    """A U-Net (1D or 2D, from the grid): ``depth`` halvings, two convolutions per level, skip connections.

    Node coordinates are appended to the input so that constant (vector) inputs still see position;
    grids that do not divide by ``2**depth`` are padded by replication and cropped back.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        field_input: bool = False,
        width: int = 32,
        depth: int = 3,
    ) -> None:
        super().__init__()
        if len(grid) not in (1, 2):
            raise ValueError(f"unet supports 1D and 2D grids, got {len(grid)}D")
        if depth < 1 or width < 1:
            raise ValueError("unet.depth and unet.width must be >= 1")
        self.grid, self.field_input, self.depth = tuple(grid), field_input, depth
        conv = nn.Conv1d if len(grid) == 1 else nn.Conv2d
        up = nn.ConvTranspose1d if len(grid) == 1 else nn.ConvTranspose2d
        self.pool = nn.MaxPool1d(2) if len(grid) == 1 else nn.MaxPool2d(2)

        def block(a: int, b: int) -> nn.Module:
            return nn.Sequential(conv(a, b, 3, padding=1), nn.GELU(), conv(b, b, 3, padding=1), nn.GELU())

        chans = [width * 2**i for i in range(depth + 1)]  # per level
        self.down = nn.ModuleList([block(in_channels + len(grid), chans[0])])
        self.down.extend(block(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(up(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(block(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = conv(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_field(x, self.grid, self.field_input)  # (B, F, *grid)
        c = _coords(self.grid, x.device, x.dtype).expand(x.shape[0], *([-1] * (len(self.grid) + 1)))
        h = torch.cat([x, c], dim=1)  # (B, F+d, *grid)
        m = 2**self.depth
        pad = [p for g in reversed(self.grid) for p in (0, (-g) % m)]
        h = nn.functional.pad(h, pad, mode="replicate")  # (B, F+d, *padded)
        skips = []
        for i, blk in enumerate(self.down):
            h = blk(h if i == 0 else self.pool(h))
            skips.append(h)
        for upc, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            h = merge(torch.cat([upc(h), skip], dim=1))
        out = self.head(h)  # (B, C, *padded)
        return out[(..., *(slice(0, g) for g in self.grid))]  # (B, C, *grid)


class DeepONet(nn.Module):
    """DeepONet (Lu et al. 2021): ``u(y) = sum_k b_k(input) t_k(y) + bias`` per output channel.

    The branch net reads the input (a vector, or a field flattened); the trunk net reads the
    coordinates ``y`` of every grid node.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        field_input: bool = False,
        hidden: int = 128,
        layers: int = 3,
        basis: int = 64,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or basis < 1:
            raise ValueError("deeponet.hidden, layers and basis must be >= 1")
        self.grid, self.out_channels, self.basis = tuple(grid), out_channels, basis
        in_dim = in_channels * math.prod(grid) if field_input else in_channels

        def mlp(a: int, b: int) -> nn.Module:
            dims = [a] + [hidden] * layers
            mods: list[nn.Module] = []
            for p, q in itertools.pairwise(dims):
                mods += [nn.Linear(p, q), nn.GELU()]
            return nn.Sequential(*mods, nn.Linear(dims[-1], b))

        self.branch = mlp(in_dim, out_channels * basis)
        self.trunk = mlp(len(grid), out_channels * basis)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch(x.flatten(1)).view(x.shape[0], self.out_channels, self.basis)  # (B, C, K)
        y = _coords(self.grid, x.device, x.dtype).flatten(1).T  # (N, d)
        t = self.trunk(y).view(-1, self.out_channels, self.basis)  # (N, C, K)
        out = torch.einsum("bck,nck->bcn", b, t) + self.bias[None, :, None]  # (B, C, N)
        return out.view(x.shape[0], self.out_channels, *self.grid)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "fno": FNO, "tfno": TFNO, "unet": UNet, "deeponet": DeepONet}


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
