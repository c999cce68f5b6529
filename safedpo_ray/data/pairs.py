"""A prepared split as training workers hold it: memory-mapped Arrow, not Python lists.

The token ids stay in the pages of the prepared file (shared by every worker on a node through
the page cache); a worker holds only what it touches, plus 8 bytes per pair of ids and 16 of
cached reference log-probs. Positions are the file's row order, fixed once prepared: the sampler's
exact-resume and batch-invariance contract rests on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from safedpo_ray.runtime.storage import localize

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def open_split(uri: str) -> pa.Table:
    """The table of a prepared split file, zero-copy from a memory map (object-store files are
    downloaded once per node first)."""
    return pa.ipc.open_file(pa.memory_map(localize(uri))).read_all()


class PairTable:
    def __init__(self, uri: str, reference_uri: str | None = None):
        self.table = open_split(uri)
        self.pair_ids = self.table.column("pair_id").to_numpy()
        self._columns = self.table.select([*ID_COLUMNS, "chosen_unsafe", "rejected_unsafe"])
        self.ref: tuple[np.ndarray, np.ndarray] | None = None
        if reference_uri:
            ref = open_split(reference_uri)
            if not np.array_equal(ref.column("pair_id").to_numpy(), self.pair_ids):
                raise RuntimeError(f"reference log-probs at {reference_uri} do not match the pairs of {uri}")
            self.ref = (ref.column("ref_chosen_logps").to_numpy(), ref.column("ref_rejected_logps").to_numpy())

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, positions: list[int]) -> dict[str, Any]:
        """Columns of the pairs at `positions`, as collate_pairs takes them."""
        idx = np.asarray(positions, dtype=np.int64)
        # One zero-copy slice per row: `take` on a multi-chunk table concatenates whole columns
        # (a copy of the split per batch).
        columns = self._columns
        out: dict[str, Any] = {k: [] for k in columns.column_names}
        for i in idx.tolist():
            row = columns.slice(i, 1).to_pydict()
            for k, v in row.items():
                out[k].append(v[0])
        if self.ref is not None:
            out["ref_chosen_logps"], out["ref_rejected_logps"] = self.ref[0][idx], self.ref[1][idx]
        return out


def write_split(dataset, path: Path, order_by: str) -> int:
    """A materialized Ray Dataset as one Arrow IPC file in `order_by` order, the fixed order the
    sampler's positions index (the driver writes it; every worker memory-maps it, as it does the
    prepared pairs). Returns its rows."""
    import ray

    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise ValueError(f"no rows to write to {path}")
    table = pa.concat_tables(tables, promote_options="default").combine_chunks().sort_by(order_by)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return table.num_rows


class RowTable:
    """The rows of a split file by position, each a dict (list columns as lists): what the SFT
    and score-model workers index with their PairSampler."""

    def __init__(self, uri: str, columns: list[str]):
        self.table = open_split(uri).select(columns)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[0] for k, v in self.table.slice(int(i), 1).to_pydict().items()}
