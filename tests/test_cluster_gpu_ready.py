"""cluster/ as a first GPU run needs it: the launcher against Ray's own `prepare_config` +
`validate_config`, the head's IAM rights, rsync excludes and file limits; the KubeRay manifests
against KubeRay's CRD schemas (tests/kuberay_crds/: the v1 openAPIV3Schema of ray-project/kuberay
v1.7.0's CRDs, unchanged; each file names its source repository, path and commit), with
`/dev/shm` as large as the memory and a scratch volume for checkpoint staging; the image's
torch/CUDA/vLLM agreement; the paper config's node wait."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRDS = Path(__file__).resolve().parent / "kuberay_crds"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --------------------------------------------------------------------------- ray up


def test_launcher_passes_rays_validation_and_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["rsync_exclude"] = ".venv"  # a string where Ray's schema wants a list
    with pytest.raises(Exception, match="rsync_exclude|is not of type"):
        validate_config(prepare_config(broken))


def _profile(node_type: dict) -> str:
    return node_type["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]


def test_head_may_start_workers_and_hand_them_their_role():
    """Ray's autoscaler runs on the head: without EC2 launch rights and iam:PassRole on the
    workers' role, `ray up` brings up a head and no worker ever starts."""
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    policy = json.loads((CLUSTER / "iam-head-policy.json").read_text())
    allowed = {a: s["Resource"] for s in policy["Statement"] if s["Effect"] == "Allow"
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    for action in ("ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:DescribeInstanceTypes",
                   "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        assert action in allowed, action
    for worker in workers:
        role = _profile(worker)  # the role shares the instance profile's name
        assert any(r.endswith(f":role/{role}") for r in allowed["iam:PassRole"]), role
        assert _profile(worker) != _profile(head)  # workers get S3 only, not EC2 rights
    worker_policy = json.loads((CLUSTER / "iam-worker-policy.json").read_text())
    assert not any(a.startswith(("ec2:", "iam:")) for s in worker_policy["Statement"] for a in s["Action"])


def test_launcher_ships_sources_only_and_raises_file_limit():
    config = load("cluster.yaml")
    assert {".venv", ".git", "runs"} <= set(config["rsync_exclude"])
    assert ".gitignore" in config["rsync_filter"]
    for command in [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
                    if "ray start" in c]:
        assert re.search(r"ulimit -n \d{5,};\s*ray start", command), command
    installs = [c for c in config["setup_commands"] if "pip install" in c and "--upgrade pip" not in c]
    assert all("-c ~/safedpo-ray/constraints.txt" in c for c in installs)  # the tested torch
    assert any("download.pytorch.org/whl/cu" in c and c.rstrip().endswith(" torch") for c in installs)
    assert any("[vllm]" in c for c in installs)


def test_paper_config_waits_for_an_autoscaled_gpu_node():
    from safedpo_ray.config.training import load_config

    cfg = load_config(REPO / "safedpo_ray" / "configs" / "paper-7b-zero3.yaml", [])
    assert cfg.run.node_wait_timeout_s >= 600  # the default 120 s is short for a GPU VM/pod start


# --------------------------------------------------------------------------- KubeRay manifests


def strict(schema):
    """The schema with unknown fields refused where Kubernetes' strict field validation (kubectl's
    default) refuses them: objects listing `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields`. The stored copy stays as published."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Validator:
    doc = json.loads((CRDS / f"{kind.lower()}-v1.openapi.json").read_text())
    assert doc["source"]["repo"] == "ray-project/kuberay" and len(doc["source"]["commit"]) == 40
    assert doc["kind"] == kind
    return jsonschema.Draft7Validator(strict(doc["openAPIV3Schema"]))


def errors(validator: jsonschema.Validator, manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_manifest_valid_against_kuberay_crd(name, kind):
    validator = crd_validator(kind)
    manifest = load(name)
    assert manifest["kind"] == kind
    assert errors(validator, manifest) == []
    broken = copy.deepcopy(manifest)
    spec = broken["spec"] if kind == "RayCluster" else broken["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["minReplica"] = 1  # a typo: pruned silently by a lax apply
    assert any("minReplica" in e for e in errors(validator, broken))
    spec["workerGroupSpecs"][0]["replicas"] = "one"
    assert any("replicas" in e for e in errors(validator, broken))


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(value))
    assert m, value
    return float(m.group(1)) * _UNITS.get(m.group(2) or "", 1)


def pod_templates(manifest: dict):
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group, group["template"]["spec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_pods_shm_sized_to_memory_and_scratch_for_checkpoints(name):
    for group_name, group, pod in pod_templates(load(name)):
        (container,) = pod["containers"]
        memory = quantity(container["resources"]["limits"]["memory"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        # Ray's object store (30% of memory by default) lives in /dev/shm
        assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= memory, group_name
        env = {e["name"]: e["value"] for e in container["env"]}
        scratch_volume = volumes[mounts[env["TMPDIR"]]]
        assert env["SAFEDPO_STAGING_DIR"].startswith(env["TMPDIR"])
        assert env["RAY_TMPDIR"] == "/tmp"  # Ray's session files where KubeRay expects them
        size = quantity(scratch_volume["emptyDir"]["sizeLimit"])
        assert quantity(container["resources"]["requests"]["ephemeral-storage"]) >= size, group_name
        if group_name != "head":
            assert size >= 2 * 81e9, group_name  # a ZeRO-3 7B checkpoint (~81 GB) staged, plus room
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# --------------------------------------------------------------------------- image


def test_dockerfile_torch_cuda_and_vllm_agree():
    text = (CLUSTER / "Dockerfile").read_text()
    base_cuda = re.search(r"^FROM rayproject/ray:[\w.]+-py\d+-(cu\d+)\s*$", text, re.M).group(1)
    assert re.search(rf"^ARG TORCH_CUDA={base_cuda}$", text, re.M)
    installs = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "--index-url \"https://download.pytorch.org/whl/${TORCH_CUDA}\" torch" in installs[0]
    assert any('"/app[vllm]"' in line for line in installs)
    assert "RUN python cluster/check_image.py" in text
    assert "cluster/check_image.py" in text.split("RUN python cluster/check_image.py")[0]  # copied first


def test_image_check_finds_mismatches():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_image", CLUSTER / "check_image.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    constraints = (REPO / "constraints.txt").read_text()
    want = check.pinned(constraints, "torch")
    ok = dict(torch_version=f"{want}+cu128", torch_cuda="12.8", image_cuda="12.8.1", constraints=constraints,
              vllm_version="0.29.0")
    assert check.problems(**ok) == []
    assert "CUDA 13.0" in check.problems(**{**ok, "torch_cuda": "13.0"})[0]
    assert "constraints.txt" in check.problems(**{**ok, "torch_version": "2.12.0+cu128"})[0]
    assert "CPU build" in check.problems(**{**ok, "torch_cuda": None})[0]
    assert "vllm" in check.problems(**{**ok, "vllm_version": None})[0]
