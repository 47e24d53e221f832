"""Offline datasets: the samples a study would stream, written once to a zarr store.

Layout (one group): arrays ``x [N*S, *in_shape]``, ``y [N*S, *out_shape]`` (float32),
``sim_id [N*S]`` and ``t_index [N*S]`` (int64), chunked by simulation (``S`` samples per
simulation) and compressed; attributes carry the problem spec, the solver config and the
sampler, and ``complete`` is set only once every simulation is written — a store whose
writer was interrupted is refused, as is a store that Surge did not write.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from trainer.problem import ProblemSpec

FORMAT = "surge-dataset"
VERSION = 1


class DatasetError(ValueError):
    """A dataset that cannot be used: missing, foreign, truncated or of another problem."""


class DatasetWriter:
    """Writes ``simulations`` simulations' samples in order; ``close()`` marks the store complete."""

    def __init__(self, path: str | Path, spec: ProblemSpec, simulations: int, extra: dict[str, Any] | None = None):
        if simulations < 1:
            raise ValueError("simulations must be >= 1")
        self.path, self.spec, self.simulations = Path(path), spec, simulations
        per = spec.samples_per_simulation
        self.rows = simulations * per
        self.group = zarr.open_group(str(self.path), mode="w")
        codec = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
        for name, shape, dtype in (
            ("x", spec.in_shape, "float32"),
            ("y", spec.out_shape, "float32"),
            ("sim_id", (), "int64"),
            ("t_index", (), "int64"),
        ):
            self.group.create_array(
                name, shape=(self.rows, *shape), chunks=(per, *shape), dtype=dtype, compressors=codec, fill_value=0
            )
        self.group.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "problem": spec.to_dict(),
                "simulations": simulations,
                "samples_per_simulation": per,
                "complete": False,
                **(extra or {}),
            }
        )
        self._row = 0

    def write(self, x: np.ndarray, y: np.ndarray, sim_id: np.ndarray, t_index: np.ndarray) -> None:
        """Append flat samples as a study streams them (``x [k, prod(in_shape)]``, ...)."""
        k = x.shape[0]
        if self._row + k > self.rows:
            raise ValueError(f"more samples than {self.simulations} simulations hold ({self.rows})")
        sl = slice(self._row, self._row + k)
        self.group["x"][sl] = x.reshape(k, *self.spec.in_shape)
        self.group["y"][sl] = y.reshape(k, *self.spec.out_shape)
        self.group["sim_id"][sl] = sim_id
        self.group["t_index"][sl] = t_index
        self._row += k

    def close(self) -> None:
        if self._row != self.rows:
            raise ValueError(f"wrote {self._row} of {self.rows} samples; the dataset stays marked incomplete")
        self.group.attrs["complete"] = True


class Dataset:
    """A complete dataset, read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"no dataset at {self.path}")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
            attrs = dict(self.group.attrs)
        except Exception as e:  # zarr raises several types for a directory that is not a store
            raise DatasetError(f"{self.path} is not a zarr store: {e}") from None
        if attrs.get("format") != FORMAT:
            raise DatasetError(f"{self.path} is not a Surge dataset (no '{FORMAT}' format attribute)")
        if attrs.get("version") != VERSION:
            raise DatasetError(f"{self.path} has dataset version {attrs.get('version')}; this Surge reads {VERSION}")
        if not attrs.get("complete"):
            raise DatasetError(f"{self.path} is incomplete: its writer stopped before the last simulation")
        self.attrs = attrs
        self.spec = ProblemSpec.from_dict(attrs["problem"])
        try:
            arrays = {k: self.group[k] for k in ("x", "y", "sim_id", "t_index")}
        except KeyError as e:
            raise DatasetError(f"{self.path} lacks the array {e}") from None
        n = attrs["simulations"] * attrs["samples_per_simulation"]
        for k, a in arrays.items():
            if a.shape[0] != n:
                raise DatasetError(f"{self.path}: array {k} holds {a.shape[0]} rows, expected {n}")
        if tuple(arrays["x"].shape[1:]) != self.spec.in_shape or tuple(arrays["y"].shape[1:]) != self.spec.out_shape:
            raise DatasetError(f"{self.path}: array shapes do not match its problem spec")
        self.x, self.y, self.sim_id, self.t_index = (arrays[k] for k in ("x", "y", "sim_id", "t_index"))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def simulations(self) -> int:
        return int(self.attrs["simulations"])

    def check_compatible(self, spec: ProblemSpec) -> None:
        """The dataset must hold the samples of ``spec`` (same problem, shapes and parameter box)."""
        mine, theirs = self.spec.to_dict(), spec.to_dict()
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise DatasetError(f"{self.path} holds another problem (differs in {', '.join(diff)})")

    def arrays(self, limit_bytes: int = 4 * 2**30) -> tuple[np.ndarray, np.ndarray]:
        """All samples in memory as flat float32 rows (refuses datasets over ``limit_bytes``)."""
        nbytes = len(self) * 4 * (int(np.prod(self.spec.in_shape)) + int(np.prod(self.spec.out_shape)))
        if nbytes > limit_bytes:
            raise DatasetError(
                f"{self.path} needs {nbytes / 2**30:.1f} GiB in memory (limit {limit_bytes / 2**30:.1f})"
            )
        return self.x[:].reshape(len(self), -1), self.y[:].reshape(len(self), -1)

    def epochs(
        self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches, epoch after epoch, forever (the caller counts steps).

        Every batch is full; the last ``len % batch_size`` samples of each shuffled epoch wait for the next.
        """
        if not 1 <= batch_size <= len(self):
            raise DatasetError(f"{self.path} holds {len(self)} samples: no batch of {batch_size} can be drawn")
        x, y = self.arrays()
        xt = torch.from_numpy(np.ascontiguousarray(x)).view(len(self), *self.spec.in_shape)
        yt = torch.from_numpy(np.ascontiguousarray(y)).view(len(self), *self.spec.out_shape)
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=g)
            for i in range(0, len(self) - batch_size + 1, batch_size):
                idx = order[i : i + batch_size]
                yield xt[idx].to(device), yt[idx].to(device)
