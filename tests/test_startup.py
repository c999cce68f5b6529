"""What makes a command start sooner and preparation faster, kept honest: the fast row check agrees
with the full one, preparation's task limit is the CPUs really free (on a local Ray at most the
cores), the cached tiny model is the model a build writes, a command reaches Ray without importing
torch or transformers, and transformers' log lines still go to the run's log file."""

from __future__ import annotations

import ast
import filecmp
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safedpo_ray.data.schema import PKU_FIELDS, validate_row
from safedpo_ray.data.stream import _plain_valid_pku, check_row
from safedpo_ray.runtime.ray_env import GPU_DEVICE_PATHS

GOOD = {"prompt": "How do I bake bread?", "response_0": "Knead and bake.", "response_1": "I cannot help.",
        "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0,
        "safer_response_id": 1}


class Str(str):
    pass


VARIANTS = [
    {}, {"better_response_id": 1}, {"safer_response_id": 0},
    {"better_response_id": True}, {"safer_response_id": False},  # bools are not ids
    {"better_response_id": 1.0}, {"safer_response_id": -0.0}, {"better_response_id": 1.5},
    {"better_response_id": 2}, {"better_response_id": -1}, {"better_response_id": "1"},
    {"is_response_0_safe": 1}, {"is_response_1_safe": 0}, {"is_response_0_safe": 2},
    {"is_response_0_safe": "true"}, {"is_response_1_safe": None}, {"is_response_0_safe": math.nan},
    {"prompt": ""}, {"prompt": "  \n"}, {"prompt": None}, {"prompt": 5}, {"prompt": Str("subclass")},
    {"response_0": ""}, {"response_1": " "}, {"response_1": "Knead and bake."},
    {"response_1": "  Knead and bake.\n"}, {"response_0": ["a"]}, {"extra": {"a": 1}},
]


@pytest.mark.parametrize("change", VARIANTS, ids=[json.dumps(v, default=str) for v in VARIANTS])
@pytest.mark.parametrize("schema", ["auto", "pku"])
def test_fast_row_check_agrees_with_the_full_one(change, schema):
    row = {**GOOD, **change}
    full = validate_row({k: v for k, v in row.items()}, "pku")
    if _plain_valid_pku(row):
        assert full == []  # the fast path only ever accepts what validate_row accepts
    pku, reasons = check_row({**row, "row_number": 7}, schema)
    assert reasons == full
    assert (pku is None) == bool(full)
    if pku is not None:
        assert pku == row and "row_number" not in pku


def test_fast_row_check_leaves_other_shapes_to_the_full_check():
    missing = {k: v for k, v in GOOD.items() if k != "safer_response_id"}
    assert not _plain_valid_pku(missing)
    pku, reasons = check_row(missing, "auto")
    assert pku is None and reasons
    pairwise = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_unsafe": False, "rejected_unsafe": True}
    pku, reasons = check_row(pairwise, "auto")
    assert reasons == [] and pku["response_0"] == "a" and set(PKU_FIELDS) <= set(pku)
    assert check_row({**GOOD, "row_number": 1}, "pairwise")[0] is None  # the schema asked for is checked


def test_tiny_model_is_built_once_and_copied(tmp_path):
    from safedpo_ray.config.training import load_config
    from safedpo_ray.models.loading import build_tiny_model
    from safedpo_ray.train.trainer import resolve_model

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}"])
    texts = ["How do I bake bread?", "Knead the dough and bake it.", "I cannot help with that."] * 10
    first = Path(resolve_model(cfg, tmp_path / "run1", texts))
    t0 = time.perf_counter()
    second = Path(resolve_model(cfg, tmp_path / "run2", texts))
    copied_s = time.perf_counter() - t0
    direct = build_tiny_model(tmp_path / "direct", texts, seed=cfg.train.seed)
    assert first == tmp_path / "run1" / "init-model" and second == tmp_path / "run2" / "init-model"
    names = sorted(p.name for p in direct.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) == sorted(p.name for p in first.iterdir())
    for name in names:  # byte for byte what a build in the run directory writes
        assert filecmp.cmp(direct / name, second / name, shallow=False), name
    assert copied_s < 1.0, copied_s
    assert len(list((tmp_path / "out" / ".cache" / "tiny-model").iterdir())) == 1
    other = Path(resolve_model(cfg, tmp_path / "run3", texts[:-1]))  # other texts: another model
    assert not filecmp.cmp(other / "tokenizer.json", second / "tokenizer.json", shallow=False)
    assert len(list((tmp_path / "out" / ".cache" / "tiny-model").iterdir())) == 2


STARTUP = r"""
import sys
from safedpo_ray.cli import main as cli
from safedpo_ray.runtime import console
args = cli.build_parser().parse_args(["train", "run.output_dir=OUT"])
console.start(args.command)
from safedpo_ray.config.training import load_config
from safedpo_ray.train.trainer import plan_data
cfg = load_config(None, args.overrides)
plan_data(cfg)
print(sorted(m for m in ("torch", "transformers", "deepspeed", "pandas") if m in sys.modules))
"""


def test_a_command_reaches_ray_without_torch_or_transformers(tmp_path):
    """The parser, the console, the config and the data plan: what runs before Ray starts (the
    heavy imports follow while ray.init waits, in trainer.start_model's thread)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = STARTUP.replace("OUT", str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    if any(Path(p).exists() for p in GPU_DEVICE_PATHS):
        imported.discard("torch")  # a machine that may have a GPU asks torch (ray_env.driver_accelerator_env)
    assert imported == set(), done.stdout


def test_preparation_runs_no_more_tasks_than_cores_on_a_local_ray(monkeypatch):
    from safedpo_ray.runtime import ray_env

    monkeypatch.setattr(ray_env, "_local_cores", 2)
    assert ray_env.parallel_cpus(4.0) == 2 and ray_env.parallel_cpus(1.0) == 1 and ray_env.parallel_cpus(0.5) == 1
    monkeypatch.setattr(ray_env, "_local_cores", None)  # a cluster: the CPUs free, whatever this machine has
    assert ray_env.parallel_cpus(64.0) == 64


def test_preparation_limit_waits_out_leases_of_tasks_that_just_returned(monkeypatch):
    """Right after Ray tasks return, their workers' leases are held for ~0.1 s:
    a limit read then (0 free CPUs) ran a whole preparation one task at a time."""
    import ray

    from safedpo_ray.data.stream import free_cpus

    seen = iter([0.0, 0.0, 2.0, 4.0, 4.0])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": next(seen)})
    assert free_cpus(wait_s=5.0) == 4.0
    held = iter([1.0, 3.0] + [2.0] * 1000)  # a search's trials keep theirs: the most seen within the wait
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": next(held)})
    t0 = time.perf_counter()
    assert free_cpus(wait_s=0.3) == 3.0 and time.perf_counter() - t0 < 2


def test_deepspeed_shm_op_off_without_probing_every_op():
    code = r"""
import os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
from safedpo_ray.config.training import load_config
from safedpo_ray.train.strategy import DeepSpeedStrategy
DeepSpeedStrategy(load_config(None, []), on_gpu=False)
import deepspeed
from deepspeed.comm.torch import build_shm_op
print(vars(deepspeed.ops)["__compatible_ops__"], build_shm_op())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{'deepspeed_shm_comm': False} None", done.stdout


LATE_IMPORT = r"""
import logging, sys
from pathlib import Path
from safedpo_ray.runtime import console
session = console.start("train")
assert "MODULE" not in sys.modules
session.attach(Path(sys.argv[1]))
import MODULE
logging.getLogger("LOGGER").warning("ROUTED-TO-FILE")
lg = logging.getLogger("MODULE")
assert session.handler in lg.handlers and not [h for h in lg.handlers if console._is_console(h)], lg.handlers
console.finish()
assert session.handler not in lg.handlers and "addHandler" not in vars(lg), lg.handlers
print("ok")
"""


@pytest.mark.parametrize("module, logger", [
    ("transformers", "transformers.models.llama"),  # imported by the workers' module, after the console starts
    ("ray.data", "ray.data._internal.execution"),  # imported by preparation: its warnings, 'execution finished'
])
def test_late_imported_libraries_log_to_the_file(tmp_path, module, logger):
    """Both give their logger a stderr handler when first imported, long after the console
    started; their lines belong in the run's log file, not on the console."""
    code = LATE_IMPORT.replace("LOGGER", logger).replace("MODULE", module)
    log = tmp_path / "console.log"
    done = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
    assert "ROUTED-TO-FILE" not in done.stderr + done.stdout, done.stderr
    assert f"WARNING {logger}: ROUTED-TO-FILE" in log.read_text()



SHUTDOWN = r"""
import subprocess
import ray
from safedpo_ray.config.training import RunConfig
from safedpo_ray.runtime import ray_env
ray_env.ensure_ray(RunConfig(), dashboard=False)
monitor = ray._private.worker._global_node.all_processes["monitor"][0].process
real = ray.shutdown
seen = {}
def shutdown():
    try:
        seen["monitor"] = monitor.wait(timeout=5)
    except subprocess.TimeoutExpired:
        seen["monitor"] = None
    real()
ray.shutdown = shutdown
ray_env.shutdown()
print(seen["monitor"], ray.is_initialized())
"""


def test_a_local_ray_stops_without_waiting_for_its_autoscaler_monitor():
    """Ray gives its monitor 1 s to exit on SIGTERM, which it sleeps through: ray_env.shutdown
    kills it first (SIGKILL), then ray.shutdown stops the rest."""
    done = subprocess.run([sys.executable, "-c", SHUTDOWN], capture_output=True, text=True, timeout=180,
                          env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "-9 False", done.stdout


IMPORT_THREADS = r"""
import importlib.abc, json, sys, threading
FIRST = {}
class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "transformers", "ray.data", "ray.train.torch") and name not in FIRST:
            FIRST[name] = threading.current_thread().name
        return None
sys.meta_path.insert(0, Recorder())
from safedpo_ray.cli.main import main
code = main(["train", *sys.argv[2:]])
print(json.dumps({"code": code, "first": FIRST}))
"""


@pytest.mark.timeout(300)
def test_start_up_imports_heavy_packages_in_one_thread(tmp_path):
    """Two start-up threads importing torch at once left one of them with a partially
    initialised torch ("module 'torch' has no attribute 'library'"): the job failed before any Ray
    work. While Ray starts, one thread imports (trainer.start_model), never two."""
    args = ["data.synthetic_prompts=16", "data.synthetic_eval_prompts=8", "data.max_length=96",
            "data.max_prompt_length=32", "train.global_batch_size=4", "train.micro_batch_size=2",
            "run.num_workers=1", "train.max_steps=1", "train.eval_every=0",
            f"run.output_dir={tmp_path / 'runs'}"]
    done = subprocess.run([sys.executable, "-c", IMPORT_THREADS, "x", *args], capture_output=True, text=True,
                          timeout=280, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert set(report["first"]) == {"torch", "transformers", "ray.data", "ray.train.torch"}, report
    assert set(report["first"].values()) == {"safedpo-model"}, report


def test_the_dashboard_port_is_never_one_of_rays_fixed_ports(monkeypatch):
    """`ray.init` refuses a dashboard port equal to the dashboard agent's default (52365): a free
    port that happens to be it is passed over."""
    import socket

    from safedpo_ray.runtime import ray_env

    handed = iter([52365, 6379, 8265, 40001])

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(handed)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", Socket)
    assert ray_env._free_port() == 40001
