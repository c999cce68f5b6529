"""The Ray Data part of the pipeline: T statistics, tokenization, truncation counts, the CLI verbs."""

import json
import subprocess
import sys

import pytest

from safedpo_ray.config.training import load_config
from safedpo_ray.train.trainer import prepare

pytestmark = pytest.mark.timeout(300)


def _pairs(prepared, split="train"):
    from safedpo_ray.data.pairs import open_split

    return open_split(prepared.data.split(split)).to_pylist()


def test_transform_statistics_and_tokenization(ray_local, tmp_path):
    def run(mode, *extra):
        cfg = load_config(None, ["data.synthetic_prompts=40", "data.max_length=24", "data.max_prompt_length=8",
                                 f"data.mode={mode}", f"run.output_dir={tmp_path}", f"run.name={mode}", *extra])
        return prepare(cfg, tmp_path / mode)

    prepared = run("safedpo")
    stats = prepared.stats["train"]
    # 40 rows at the 40/35/10/15 mix: 16 safe-safe, 14 swapped, 4 safe-unsafe kept, 6 discarded
    assert stats["transform"] == {"safe_safe": {"kept": 16}, "unsafe_safe": {"swapped": 14},
                                  "safe_unsafe": {"kept": 4}, "unsafe_unsafe": {"discarded": 6}}
    rows = _pairs(prepared)
    assert stats["pairs"] == 34 == len(rows)
    assert stats["pair_types"] == {"safe_safe": 16, "safe_unsafe": 18}
    assert all(len(r["prompt_ids"]) <= 8 for r in rows)
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 24 for r in rows)
    assert stats["truncated"]["prompt"] > 0 and stats["truncated"]["chosen"] > 0
    assert not any(r["chosen_unsafe"] for r in rows)  # T: the chosen response is always safe
    assert [r["pair_id"] for r in rows] == sorted(r["pair_id"] for r in rows)  # source order
    # modes on the same rows (each its own preparation: the mode is part of the key)
    helpful = run("helpful").stats["train"]
    assert helpful["pairs"] == 40 and helpful["pair_types"]["unsafe_safe"] == 14
    assert run("safebetter").stats["train"]["pairs"] == 20
    # the held-out split always goes through SafeDPO's T
    assert run("helpful").stats["eval"]["mode"] == "safedpo"


def test_preparation_leaves_the_process_data_context_alone(ray_local, tmp_path):
    """A preparation limits its own Ray Data CPUs to those free at the time (2 of 4 here) on its
    dataset's copy of the DataContext: the limit and preserve_order do not stay on the process's
    context for every later Ray Data pass of the same process."""
    import ray
    from ray.data import DataContext

    @ray.remote(num_cpus=2)
    class Busy:
        def ready(self):
            return True

    busy = Busy.remote()
    ray.get(busy.ready.remote())
    try:
        limits = DataContext.get_current().execution_options.resource_limits
        assert limits.cpu == float("inf")
        cfg = load_config(None, ["data.synthetic_prompts=16", "data.max_length=24", "data.max_prompt_length=8",
                                 f"run.output_dir={tmp_path}"])
        assert prepare(cfg, tmp_path / "p").stats["train"]["pairs"] > 0
        assert DataContext.get_current().execution_options.resource_limits.cpu == float("inf")
        assert not DataContext.get_current().execution_options.preserve_order
    finally:
        ray.kill(busy)


def test_prepared_pairs_are_reused_and_prepared_anew_when_an_input_changes(ray_local, tmp_path):
    good = {"prompt": "How do I bake bread?", "response_0": "Mix flour and water, knead, bake.",
            "response_1": "I can't help.", "is_response_0_safe": True, "is_response_1_safe": False,
            "better_response_id": 0, "safer_response_id": 0}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**good, "prompt": f"q{i}"}) + "\n" for i in range(40)))
    base = [f"data.source={data}", "data.eval_fraction=0.2", f"run.output_dir={tmp_path}"]

    def run(name, *extra):
        return prepare(load_config(None, base + [f"run.name={name}", *extra]), tmp_path / name)

    first = run("a")
    assert not first.data.reused and first.stats["train"]["pairs"] + first.stats["eval"]["pairs"] == 40
    again = run("b")
    assert again.data.reused and again.data.key == first.data.key and again.data.seconds < 2
    assert run("c", "data.max_length=400").data.key != first.data.key  # a setting that changes the pairs
    assert run("d", "data.tokenize_batch_size=7").data.key == first.data.key  # one that does not
    with data.open("a") as f:  # the source changed
        f.write(json.dumps({**good, "prompt": "one more"}) + "\n")
    changed = run("e")
    assert changed.data.key != first.data.key and not changed.data.reused
    assert changed.stats["train"]["rows_read"] + changed.stats["eval"]["rows_read"] == 41


def test_prepare_quarantines_and_writes_statistics(ray_local, tmp_path):
    good = {"prompt": "How do I bake bread?", "response_0": "Mix flour and water, knead, bake.",
            "response_1": "I can't help.", "is_response_0_safe": True, "is_response_1_safe": True,
            "better_response_id": 0, "safer_response_id": 0}
    lines = [json.dumps({**good, "prompt": f"{good['prompt']} ({i})"}) for i in range(30)]
    lines.insert(3, json.dumps({**good, "better_response_id": 7}))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"data.source={data}", f"data.eval_source={data}",
                             f"run.output_dir={tmp_path}", "run.name=prep"])
    run_dir = tmp_path / "prep"
    prepared = prepare(cfg, run_dir)
    assert prepared.stats["train"]["rows_quarantined"] == 1 and prepared.stats["train"]["pairs"] == 30
    q = [json.loads(l) for l in (run_dir / "quarantine.jsonl").open()]
    assert q[0]["row_number"] == 4 and q[0]["split"] == "train"
    assert json.loads((run_dir / "data_stats.json").read_text())["eval"]["pairs"] == 30


def test_cli_config_errors_exit_2_with_the_key():
    out = subprocess.run([sys.executable, "-m", "safedpo_ray.cli", "config", "train.bta=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown config key 'train.bta'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "safedpo_ray.cli", "config", "train.delta=5"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "delta: 5.0" in out.stdout


def test_cli_prepare_writes_prepared_pairs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "safedpo_ray.cli", "prepare", "data.synthetic_prompts=40",
         "data.synthetic_eval_prompts=10", f"run.output_dir={tmp_path}", "run.name=p"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "swapped 14" in out.stdout and "discarded 6" in out.stdout
    prepared = list((tmp_path / ".cache" / "prepared").glob("*/train.arrow"))
    assert len(prepared) == 1 and str(prepared[0].parent) in out.stdout


def test_gpus_asked_of_a_local_ray_without_them_fail_fast(ray_local, tmp_path):
    from safedpo_ray.train.trainer import RunError, train

    cfg = load_config(None, ["run.use_gpu=true", f"run.output_dir={tmp_path}", "run.name=gpu"])
    with pytest.raises(RunError, match="has 0 GPUs"):
        train(cfg)
