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

    @property
    def blocks(self) -> int:
        """Chunks along the sample axis."""
        return -(-len(self) // self.block_rows)

    @property
    def block_rows(self) -> int:
        """Rows per zarr chunk along the sample axis: the unit an epoch is shuffled and split in."""
        return int(self.x.chunks[0])

    def epoch_order(self, epoch: int, seed: int = 0, rank: int = 0, world: int = 1) -> np.ndarray:
        """The chunk indices ``rank`` of ``world`` reads in ``epoch`` (the same permutation on every rank).

        Chunks, not rows, are permuted and dealt out: a rank reads whole compressed chunks (one simulation
        each, as written) and never decompresses a chunk for a single row. The ranks' shares of one epoch
        are disjoint and together hold every chunk exactly once. Unlike torch's ``DistributedSampler`` no
        chunk is repeated to even the shares out: a rank with one chunk fewer simply starts its next epoch
        sooner, and no sample is seen twice in an epoch.
        """
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world}: need 0 <= rank < world")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(self.blocks, generator=g).numpy()[rank::world]

    def epochs(
        self,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world: int = 1,
        window_bytes: int = 256 * 2**20,
        keys: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shuffled batches, epoch after epoch, forever (the caller counts steps).

        Each epoch a rank reads its share of chunks (``epoch_order``) lazily, a window of about
        ``window_bytes`` at a time, and shuffles the rows inside the window, so memory stays bounded
        whatever the dataset's size. Every batch is full: rows that do not fill one wait for the next
        window or epoch, so nothing is dropped. Given a list as ``keys``, the ``(sim_id, t_index)`` of
        each batch is appended to it as the batch is handed out.
        """
        if not 1 <= batch_size <= len(self):
            raise DatasetError(f"{self.path} holds {len(self)} samples: no batch of {batch_size} can be drawn")
        self.epoch_order(0, seed, rank, world)  # checks rank and world before anything is read
        if world > self.blocks:
            raise DatasetError(f"{self.path} holds {self.blocks} chunks: too few to share among {world} trainer ranks")
        row_bytes = 4 * (int(np.prod(self.spec.in_shape)) + int(np.prod(self.spec.out_shape)))
        per_window = max(1, window_bytes // (row_bytes * self.block_rows))
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * rank + 1)
        carry_x = np.empty((0, *self.spec.in_shape), np.float32)
        carry_y = np.empty((0, *self.spec.out_shape), np.float32)
        carry_k = np.empty((2, 0), np.int64)
        epoch = 0
        while True:
            order = self.epoch_order(epoch, seed, rank, world)
            for w in range(0, len(order), per_window):
                xs, ys, ks = [carry_x], [carry_y], [carry_k]
                for b in np.sort(order[w : w + per_window]):  # ascending: sequential reads
                    sl = slice(int(b) * self.block_rows, min(len(self), (int(b) + 1) * self.block_rows))
                    xs.append(self.x[sl])
                    ys.append(self.y[sl])
                    if keys is not None:
                        ks.append(np.stack([self.sim_id[sl], self.t_index[sl]]))
                x, y, k = np.concatenate(xs), np.concatenate(ys), np.concatenate(ks, axis=1)
                perm = torch.randperm(len(x), generator=g).numpy()
                full = len(x) - len(x) % batch_size
                xt, yt = torch.from_numpy(x[perm[:full]]), torch.from_numpy(y[perm[:full]])
                for i in range(0, full, batch_size):
                    if keys is not None:
                        keys.append(tuple(k[:, perm[i : i + batch_size]]))
                    yield xt[i : i + batch_size].to(device), yt[i : i + batch_size].to(device)
                carry_x, carry_y = x[perm[full:]], y[perm[full:]]
                if keys is not None:
                    carry_k = k[:, perm[full:]]
            epoch += 1
