"""Prepared splits as workers hold them: memory-mapped Arrow files, not Python lists."""

import numpy as np
import pyarrow as pa
import pytest

from safedpo_ray.data.stream import PAIR_SCHEMA, SplitWriter, pair_id, row_location
from safedpo_ray.data.tokenize import collate_pairs
from safedpo_ray.data.pairs import PairTable, open_split


def write_split(path, n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append({"pair_id": pair_id(i % 3, i + 1),
                     "prompt_ids": rng.integers(0, 500, rng.integers(1, 20)).tolist(),
                     "chosen_ids": rng.integers(0, 500, rng.integers(1, 30)).tolist(),
                     "rejected_ids": rng.integers(0, 500, rng.integers(1, 30)).tolist(),
                     "chosen_unsafe": False, "rejected_unsafe": bool(i % 2), "prompt": f"p{i}"})
    w = SplitWriter(path)
    for b in range(0, n, 1000):  # several record batches, as the pipeline writes them
        w.write(pa.Table.from_pylist(rows[b:b + 1000], schema=PAIR_SCHEMA))
    w.close()
    return rows


def test_batches_are_the_rows_at_those_positions(tmp_path):
    rows = write_split(tmp_path / "train.arrow", 2500)
    table = PairTable(str(tmp_path / "train.arrow"))
    assert len(table) == 2500 and table.pair_ids.tolist() == [r["pair_id"] for r in rows]
    positions = [2499, 0, 1000, 999, 1500]
    got = table.batch(positions)
    for j, i in enumerate(positions):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids", "rejected_unsafe"):
            assert got[k][j] == rows[i][k]
    a = collate_pairs(got, pad_token_id=0)
    b = collate_pairs([rows[i] for i in positions], pad_token_id=0)
    for k in a:
        assert a[k].equal(b[k]), k


def test_a_split_is_memory_mapped_not_copied(tmp_path):
    write_split(tmp_path / "big.arrow", 40000)
    size = (tmp_path / "big.arrow").stat().st_size
    assert size > 5 * 2**20
    before = pa.total_allocated_bytes()
    table = PairTable(str(tmp_path / "big.arrow"))
    # only the pair ids (8 bytes a pair) are copied out of the map
    assert pa.total_allocated_bytes() - before < 0.1 * size
    assert table.pair_ids.nbytes == 8 * 40000
    # and a batch copies its rows, not the columns they sit in (Arrow's `take` over a table of
    # several record batches concatenates each column first)
    peak = pa.default_memory_pool().max_memory()
    table.batch([5, 39999, 20000, 1001])
    assert pa.default_memory_pool().max_memory() - peak < 0.05 * size


def test_reference_logps_must_match_the_pairs(tmp_path):
    write_split(tmp_path / "train.arrow", 10)
    ids = open_split(str(tmp_path / "train.arrow")).column("pair_id")
    ref = pa.table({"pair_id": ids, "ref_chosen_logps": np.arange(10.0), "ref_rejected_logps": -np.arange(10.0)})
    with pa.ipc.new_file(str(tmp_path / "ref.arrow"), ref.schema) as w:
        w.write_table(ref)
    table = PairTable(str(tmp_path / "train.arrow"), str(tmp_path / "ref.arrow"))
    assert table.batch([3, 7])["ref_chosen_logps"].tolist() == [3.0, 7.0]
    shuffled = ref.take([1, 0] + list(range(2, 10)))
    with pa.ipc.new_file(str(tmp_path / "bad.arrow"), ref.schema) as w:
        w.write_table(shuffled)
    with pytest.raises(RuntimeError, match="do not match"):
        PairTable(str(tmp_path / "train.arrow"), str(tmp_path / "bad.arrow"))


def test_pair_ids_encode_file_and_row():
    assert row_location(pair_id(5, 123456)) == (5, 123456)
    assert pair_id(0, 7) == 7 and pair_id(1, 1) > pair_id(0, 2**31)


def test_sft_and_scorer_examples_are_written_in_id_order_and_read_by_position(tmp_path, ray_local):
    """sft and train-scorer hand their tokenized rows to the workers as train does its pairs: one
    Arrow file (written by the driver from the Ray Dataset, ordered by id) every worker maps."""
    import ray.data

    from safedpo_ray.data.pairs import RowTable
    from safedpo_ray.data.pairs import write_split as write_rows

    rng = np.random.default_rng(0)
    rows = [{"example_id": int(i), "prompt_ids": rng.integers(0, 500, rng.integers(1, 9)).tolist(),
             "response_ids": rng.integers(0, 500, rng.integers(1, 9)).tolist(), "unsafe": bool(i % 3 == 0)}
            for i in rng.permutation(50)]
    ds = ray.data.from_items(rows, override_num_blocks=4).materialize()  # blocks in no id order
    assert write_rows(ds, tmp_path / "data" / "train.arrow", order_by="example_id") == 50
    table = RowTable(str(tmp_path / "data" / "train.arrow"), ["example_id", "prompt_ids", "response_ids", "unsafe"])
    by_id = {r["example_id"]: r for r in rows}
    assert len(table) == 50
    assert [table[i]["example_id"] for i in range(50)] == list(range(50))
    for i in (0, 17, 49):
        assert table[i] == by_id[i] and isinstance(table[i]["prompt_ids"], list)
    with pytest.raises(ValueError, match="no rows"):
        write_rows(ds.limit(0).materialize(), tmp_path / "empty.arrow", order_by="example_id")
