"""cluster/: the `ray up` launcher YAML (against Ray's own schema), the KubeRay manifests, and the
commands the docs tell people to run: each entry point must be a valid `safedpo-ray` command line
whose config exists and loads."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from safedpo_ray.cli.main import build_parser
from safedpo_ray.config.training import load_config
from safedpo_ray.cli.jobs import build_job
from safedpo_ray.runtime.storage import is_remote

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/app/"  # where cluster/Dockerfile puts this repository


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def in_repo(path: str) -> Path:
    """An image path (/app/...) or repository-relative path, on this checkout."""
    return REPO / path[len(IMAGE_ROOT):] if path.startswith(IMAGE_ROOT) else REPO / path


def check_train_command(command: str):
    """Parse a `safedpo-ray train ...` entry point with the real parser and load its config."""
    argv = shlex.split(command)
    assert argv[0] == "safedpo-ray", command
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.config is not None, command
    config = in_repo(str(args.config))
    assert config.is_file(), f"{args.config} does not exist in this repository"
    return load_config(config, args.overrides)


def test_launcher_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does first
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(broken))  # (the check can fail)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["file_mounts"] == {"~/safedpo-ray": "."}  # this repository on every node...
    assert any("pip install" in c and "~/safedpo-ray" in c for c in config["setup_commands"])  # ...installed
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the job server is not exposed
    assert any(t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))
               for name, t in config["available_node_types"].items() if name != config["head_node_type"])


def test_raycluster_manifest():
    rc = load("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == ray.__version__  # the image's Ray must be the one pinned
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # not exposed beyond the cluster
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    (gpu,) = spec["workerGroupSpecs"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    readme = (CLUSTER / "README.md").read_text()
    assert f"svc/{rc['metadata']['name']}-head-svc 8265:8265" in readme  # the port-forward documented


def test_rayjob_runs_a_valid_train_command():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cfg = check_train_command(spec["entrypoint"])
    assert cfg.run.storage_path and is_remote(cfg.run.storage_path)  # outputs survive the cluster
    assert cfg.run.use_gpu and cfg.run.max_failures >= 1 and cfg.run.name
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for g in cluster["workerGroupSpecs"])
    assert gpus == cfg.run.num_workers  # one worker per GPU: the cluster fits the run exactly
    assert spec["shutdownAfterJobFinishes"] is True


def test_dockerfile_puts_the_configs_where_the_manifests_look():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY --chown=ray:users safedpo_ray ./safedpo_ray" in dockerfile
    assert f"rayproject/ray:{ray.__version__}" in dockerfile


def _documented_commands(text: str) -> list[str]:
    """`safedpo-ray ...` lines of the ```bash blocks, with continuations joined, comments dropped
    and the block's `export NAME=VALUE` variables put in."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        exported: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("export "):
                exported.update(item.split("=", 1) for item in shlex.split(line)[1:] if "=" in item)
            if line.startswith("safedpo-ray ") and "|" not in line and "[" not in line:
                for name, value in exported.items():
                    line = line.replace(f"${name}", value)
                assert "$" not in line, line
                commands.append(line)
    return commands


@pytest.mark.parametrize("doc", ["cluster/README.md", "README.md"])
def test_documented_cluster_commands_are_valid(doc, monkeypatch):
    """Every `safedpo-ray submit/jobs` command the docs show parses; each submitted job passes the
    same checks `submit` makes before shipping (config exists in the shipped dir, and loads)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_TOKEN", "x")
    commands = [c for c in _documented_commands((REPO / doc).read_text()) if c.split()[1] in ("submit", "jobs")]
    assert any(c.startswith("safedpo-ray submit") for c in commands), doc
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        if args.command == "submit":
            job = build_job(args.job, working_dir=REPO)
            assert job["entrypoint"].startswith("safedpo-ray "), command
