"""Hostile and careless inputs, second round (issue 25): no path escapes, no traceback, no silent
change to the data. Every case builds its files in tmp_path, runs without Ray (a patched
`ensure_ray` fails the test if it is reached) and checks the exact sentence, the exit code, the
rows kept and quarantined, and that no directory is left behind.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from safedpo_ray.cli.main import main as cli_main
from safedpo_ray.data.file_checks import Skipped
from safedpo_ray.data.files import SourceError, resolve_files
from safedpo_ray.data.readers import read_chunk
from safedpo_ray.data.sources import chunks_for
from safedpo_ray.data.stream import check_row

pytestmark = pytest.mark.timeout(240)

GOOD = {"prompt": "How do I bake bread?", "response_0": "Knead the dough and bake it.",
        "response_1": "I cannot help with that.", "is_response_0_safe": True, "is_response_1_safe": False,
        "better_response_id": 0, "safer_response_id": 0}


def rows_text(n: int, start: int = 0) -> str:
    return "".join(json.dumps({**GOOD, "prompt": f"question {i}"}) + "\n" for i in range(start, start + n))


@pytest.fixture()
def no_ray(monkeypatch):
    import safedpo_ray.train.trainer as trainer

    def boom(*a, **k):
        raise AssertionError("Ray was started for a problem that must be reported before it")

    monkeypatch.setattr(trainer, "ensure_ray", boom)


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- configs


def test_run_name_cannot_leave_output_dir(tmp_path, capsys, no_ray):
    good = tmp_path / "d.jsonl"
    good.write_text(rows_text(3))
    for name in ("../../somewhere", "/abs/run", "..", "a/b"):
        rc, err = run_cli(capsys, "train", f"data.source={good}", f"run.output_dir={tmp_path / 'runs'}",
                          f"run.name={name}")
        assert rc == 2
        assert one_line(err) == (
            f"safedpo-ray: config error: 'run.name' must be a single directory name (no '/', '\\', '..' or "
            f"absolute path), got '{name}': the run is written to run.output_dir/run.name; move it with "
            "run.output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written anywhere
    assert not Path("/abs").exists()


def test_yaml_files_unsafe_malformed_missing(tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "unsafe.yaml").write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    (tmp_path / "bad.yaml").write_text("train:\n  beta: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    cases = {
        "unsafe.yaml": "the YAML tag !!python/object/apply:os.system at line 1, column 8 is not allowed (config "
                       "values are plain YAML: numbers, strings, lists, mappings); fix the file",
        "bad.yaml": "not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'; fix the file",
    }
    for name, what in cases.items():
        rc, err = run_cli(capsys, "config", "--config", str(tmp_path / name))
        assert rc == 2 and one_line(err) == f"safedpo-ray: config error: config file '{tmp_path / name}': {what}"
    rc, err = run_cli(capsys, "config", "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2 and one_line(err) == (f"safedpo-ray: config error: config file '{tmp_path / 'nope.yaml'}' does "
                                         "not exist: give --config an existing YAML file")
    rc, err = run_cli(capsys, "config", "--config", str(tmp_path))
    assert rc == 2 and "is a directory: give --config a YAML file" in one_line(err)
    rc, err = run_cli(capsys, "config", "--config", str(tmp_path / "list.yaml"))
    assert rc == 2 and one_line(err).endswith("list.yaml: top level must be a mapping")
    rc, err = run_cli(capsys, "config", "train.beta=[1")
    assert rc == 2 and one_line(err) == ("safedpo-ray: config error: override 'train.beta=[1': not valid YAML at "
                                         "line 1, column 3: expected ',' or ']', but got '<stream end>'; quote the "
                                         "value or fix it")
    assert not marker.exists()  # the tag was refused, never run


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path, capsys, no_ray):
    rc, err = run_cli(capsys, "train", "--verbose", f"data.source={tmp_path / 'none.jsonl'}",
                      f"run.output_dir={tmp_path / 'runs'}", "run.name=r")
    assert rc == 2 and "Traceback" in err and "is not a file and not a hub dataset id" in err


# --------------------------------------------------------------------------- run directories


def test_unwritable_output_dir_is_one_sentence(tmp_path, capsys, no_ray):
    good = tmp_path / "d.jsonl"
    good.write_text(rows_text(3))
    (tmp_path / "afile").write_text("x")
    rc, err = run_cli(capsys, "train", f"data.source={good}", f"run.output_dir={tmp_path / 'afile' / 'runs'}",
                      "run.name=r")
    assert rc == 2 and one_line(err) == (
        f"safedpo-ray: run.output_dir: cannot create the run directory {tmp_path / 'afile' / 'runs' / 'r'}: "
        f"{tmp_path / 'afile'} is not a directory; choose another run.output_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_output_dir_is_one_sentence(tmp_path, capsys, no_ray):  # pragma: no cover (root here)
    good = tmp_path / "d.jsonl"
    good.write_text(rows_text(3))
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    rc, err = run_cli(capsys, "train", f"data.source={good}", f"run.output_dir={ro}", "run.name=r")
    assert rc == 2 and "cannot write the run directory" in one_line(err)


def test_an_early_error_leaves_no_run_directory(tmp_path, capsys, no_ray):
    (tmp_path / "cols.jsonl").write_text(json.dumps({"q": "x"}) + "\n")
    out = tmp_path / "out" / "nested"
    rc, err = run_cli(capsys, "train", f"data.source={tmp_path / 'cols.jsonl'}", f"run.output_dir={out}",
                      "run.name=r")
    assert rc == 2 and "columns match no known schema" in one_line(err)
    assert not (tmp_path / "out").exists()  # run dir (config.yaml was written) and the parents it made: gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    rc, _ = run_cli(capsys, "train", f"data.source={tmp_path / 'cols.jsonl'}", f"run.output_dir={tmp_path / 'mine'}",
                    "run.name=r")
    assert rc == 2 and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]  # existing: kept


# --------------------------------------------------------------------------- checkpoints and weights


def test_no_intact_checkpoint_says_what_it_tried_and_is_one_sentence(tmp_path, monkeypatch, capsys):
    from safedpo_ray.errors import UserError
    from safedpo_ray.train import checkpoints
    from safedpo_ray.train.worker_errors import user_error_in

    class Ckpt:
        def __init__(self, path):
            self.path = str(path)

        def as_directory(self):
            import contextlib
            return contextlib.nullcontext(self.path)

    class Strategy:
        is_rank0, rank, world_size = True, 0, 1

    cands = []
    for name, step in (("checkpoint_c", 6), ("checkpoint_b", 4), ("checkpoint_a", 2)):
        (tmp_path / name).mkdir()  # no manifest: written only in part
        cands.append(checkpoints.Candidate(Ckpt(tmp_path / name), step))
    monkeypatch.setattr(checkpoints, "candidates", lambda: cands)
    with pytest.raises(checkpoints.NoIntactCheckpoint) as exc:
        checkpoints.restore(Strategy())
    out = capsys.readouterr().out
    assert "checkpoint checkpoint_c (step 6) is damaged or incomplete: no manifest" in out
    assert "step 6) is damaged or incomplete: no manifest: the checkpoint was written only in part (or by an " \
           "older safedpo-ray); trying the earlier checkpoint checkpoint_b" in out
    assert "checkpoint_b (step 4) is damaged" in out and out.count("no earlier checkpoint left") == 1
    assert out.splitlines()[-1].endswith("no earlier checkpoint left")
    assert isinstance(exc.value, UserError)
    sentence = str(exc.value)

    class RayTaskLike(Exception):  # what Ray Train hands the driver: a worker's error inside a group error
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ... 49 lines ...")
            self.cause = cause

    class GroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    found = user_error_in(GroupError({0: RayTaskLike(exc.value), 1: RayTaskLike(exc.value)}))
    assert isinstance(found, UserError) and str(found) == sentence and "\n" not in sentence
    assert sentence.startswith("none of the run's 3 checkpoint(s) is intact (checkpoint_c, checkpoint_b, checkpoint_a)")
    assert user_error_in(GroupError({0: RuntimeError("a bug")})) is None  # a bug stays a traceback


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_only_weights_are_refused_on_the_driver_before_ray(tmp_path, capsys, no_ray):
    import torch

    marker = tmp_path / "ran"
    model = tmp_path / "evil-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2), "payload": _Payload(str(marker))}, model / "pytorch_model.bin")
    good = tmp_path / "d.jsonl"
    good.write_text(rows_text(3))
    rc, err = run_cli(capsys, "train", f"data.source={good}", f"model.name_or_path={model}",
                      f"run.output_dir={tmp_path / 'runs'}", "run.name=r")
    assert rc == 2
    line = one_line(err)
    assert line.startswith(f"safedpo-ray: model {model}: pytorch_model.bin is a pickle that "
                           "torch.load(weights_only=True) refuses (it holds posix.system")
    assert line.endswith("`save_pretrained(out, safe_serialization=True)`) and use that directory")
    assert not marker.exists() and not (tmp_path / "runs").exists()
    # plain tensors in a pickle pass the check (torch.load(weights_only=True) loads them in the worker)
    from safedpo_ray.runtime.safe_loading import check_pickle_weights

    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    check_pickle_weights(model)


# --------------------------------------------------------------------------- rows


def read_all(source: str) -> list[dict]:
    chunks, _, _ = chunks_for(source, count=True)
    return [r for c in chunks for r in read_chunk(c)]


def test_duplicate_keys_in_a_row_are_quarantined(tmp_path):
    good = json.dumps({**GOOD, "prompt": "fine"})
    twice = json.dumps(GOOD)[:-1] + ', "better_response_id": 1}'
    nested = json.dumps({**GOOD, "prompt": "meta"})[:-1] + ', "meta": {"a": 1, "a": 2}}'
    (tmp_path / "d.jsonl").write_text("\n".join([good, twice, nested]) + "\n")
    rows = read_all(str(tmp_path / "d.jsonl"))
    assert [r.get("__invalid__") for r in rows] == [
        None,
        "the key 'better_response_id' appears twice (0, then 1): which value is meant is unknown; keep one",
        "the key 'a' appears twice (1, then 2): which value is meant is unknown; keep one"]
    assert [r["row_number"] for r in rows] == [1, 2, 3]
    (tmp_path / "d.json").write_text("[" + ",".join([good, twice]) + "]")
    rows = read_all(str(tmp_path / "d.json"))
    assert "__invalid__" not in rows[0] and rows[0]["prompt"] == "fine"
    assert rows[1]["__invalid__"].startswith("the key 'better_response_id' appears twice (0, then 1)")


def test_nan_id_is_named_as_nan_not_missing(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD)[:-1].replace('"better_response_id": 0', '"better_response_id": NaN')
                                      + "}\n")
    (row,) = read_all(str(tmp_path / "d.jsonl"))
    _, reasons = check_row({k: v for k, v in row.items() if k != "row_number"}, "auto")
    assert reasons == ["field 'better_response_id' is NaN (not a number), not a value"]


def test_gzip_cut_mid_stream_keeps_the_rows_before_the_cut(tmp_path):
    data = gzip.compress(rows_text(3000).encode(), compresslevel=1)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    rows = read_all(str(cut))
    good = [r for r in rows if "__invalid__" not in r]
    bad = [r for r in rows if "__invalid__" in r]
    assert len(bad) == 1 and bad[0]["row_number"] == len(good) + 1 and 1000 < len(good) < 2000
    assert [r["prompt"] for r in good] == [f"question {i}" for i in range(len(good))]  # every row before the cut
    assert bad[0]["__invalid__"].startswith("the gzipped file cannot be read from this row on (EOFError: ")
    assert bad[0]["__invalid__"].endswith(f"it was cut or damaged; rows 1 to {len(good)} were read, the rest is lost")
    cut.write_bytes(data[:15])  # nothing readable at all: the file as a whole, one sentence
    with pytest.raises(SourceError, match="cut.jsonl.gz: cannot be read"):
        read_all(str(cut))


# --------------------------------------------------------------------------- files of a source


def shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_text(rows_text(2, 0))
    (d / "b.jsonl").write_text(rows_text(2, 10))
    return d


def test_the_same_file_twice_is_read_once_and_named(tmp_path):
    d = shards(tmp_path)
    (d / "c.jsonl").symlink_to(d / "a.jsonl")  # a glob plus a symlink
    report: list = []
    files = resolve_files(str(d / "*.jsonl"), report)
    assert [f.uri for f in files] == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    assert report == [Skipped(str(d / "c.jsonl"), f"the same file as {d / 'a.jsonl'}, already read (reached twice, "
                                                  "through a symbolic link or an overlapping pattern)")]
    (d / "c.jsonl").unlink()
    (d / "again").symlink_to(d, target_is_directory=True)  # a directory symlink (a loop, too)
    (d / "sub").mkdir()
    (d / "sub" / "s.jsonl").write_text(rows_text(1, 20))
    report = []
    files = resolve_files(str(d), report)
    assert [f.uri for f in files] == [str(d / "a.jsonl"), str(d / "b.jsonl"), str(d / "sub" / "s.jsonl")]
    assert report == [Skipped(str(d / "again") + "/", "directory already read through another path (a symbolic link)"),
                      f"subdir:{d / 'sub' / 's.jsonl'}"]
    rows = [r for c in chunks_for(str(d))[0] for r in read_chunk(c)]
    assert sorted(r["prompt"] for r in rows) == ["question 0", "question 1", "question 10", "question 11",
                                                 "question 20"]  # each pair once


def test_dangling_links_hidden_and_empty_files_are_named_not_fatal(tmp_path):
    d = shards(tmp_path)
    (d / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    (d / "empty.jsonl").write_text("")
    (d / "README.md").write_text("notes")
    (d / "_SUCCESS").write_text("")
    report: list = []
    files = resolve_files(str(d), report)
    assert [f.uri for f in files] == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    assert set(report) == {
        Skipped(str(d / "empty.jsonl"), "empty file (0 bytes)"),
        Skipped(str(d / "gone.jsonl"), f"symbolic link to '{tmp_path / 'deleted.jsonl'}', which does not exist"),
        Skipped(str(d / "README.md"), "not a data file (.jsonl, .json, .csv, .parquet, or gzipped text)"),
        Skipped(str(d / "_SUCCESS"), "hidden file (name starts with '.' or '_')")}
    report = []
    resolve_files(str(d / "*.jsonl"), report)
    assert Skipped(str(d / "gone.jsonl"), f"symbolic link to '{tmp_path / 'deleted.jsonl'}', which does not exist") \
        in report
    only = tmp_path / "only"
    only.mkdir()
    (only / "e1.jsonl").write_text("")
    (only / "e2.jsonl").write_text("")
    with pytest.raises(SourceError, match=r"e1.jsonl: the file is empty \(and 1 more empty files\)"):
        resolve_files(str(only))


def test_console_names_files_read_and_skipped_and_a_blank_shard_does_not_stop_the_run(tmp_path, capsys):
    from safedpo_ray.config.training import load_config
    from safedpo_ray.train.trainer import plan_data

    d = shards(tmp_path)
    (d / "blank.jsonl").write_text("\n  \n")
    (d / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    (d / "sub").mkdir()
    (d / "sub" / "s.jsonl").write_text(rows_text(1, 20))
    capsys.readouterr()
    plan = plan_data(load_config(None, [f"data.source={d}"]))
    assert len(plan.names) == 4  # blank.jsonl is read (no rows), the others have rows
    out = capsys.readouterr().out
    assert f"[safedpo] data source '{d}': 3 files read: {d / 'a.jsonl'}, {d / 'b.jsonl'}, {d / 'sub' / 's.jsonl'}" in out
    assert f"  1 of them in subdirectories (read too): {d / 'sub' / 's.jsonl'}" in out
    assert (f"  2 skipped, not read: {d / 'gone.jsonl'} (symbolic link to '{tmp_path / 'deleted.jsonl'}', which "
            f"does not exist); {d / 'blank.jsonl'} (no rows: only blank lines)") in out
    (tmp_path / "blank_only").mkdir()
    (tmp_path / "blank_only" / "x.jsonl").write_text("\n\n")
    with pytest.raises(SourceError, match="x.jsonl: the file has no rows"):
        plan_data(load_config(None, [f"data.source={tmp_path / 'blank_only'}"]))


def test_data_summary_names_duplicates_when_there_are_any():
    from safedpo_ray.data.pipeline import format_stats

    split = {"rows_read": 5, "rows_quarantined": 0, "rows_duplicate": 2, "pairs": 5, "mode": "safedpo",
             "transform": {"safe_unsafe": {"kept": 5}}, "truncated": {"prompt": 0, "chosen": 0, "rejected": 0}}
    text = format_stats({"train": split})
    assert "  duplicates: 2 rows repeat an earlier row of the split (trained again, unless " \
           "data.drop_duplicates=true quarantines them)" in text
    assert "duplicates" not in format_stats({"train": {**split, "rows_duplicate": 0}})
