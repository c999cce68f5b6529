"""Run storage (safedpo_ray/runtime/storage.py): paths and URIs, an S3 store on 127.0.0.1, rank 0's logs
following the checkpoints, the multi-node refusal; and the fault-tolerance settings (train/faults.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from s3_server import S3Server
from safedpo_ray.runtime import storage
from safedpo_ray.config.training import ConfigError, RunConfig, load_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def test_join_keeps_the_query_and_redact_hides_secrets(tmp_path):
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    uri = "s3://bucket/prefix/?endpoint_override=http://h:9000&secret_key=abc"
    assert storage.join(uri, "run", "model") == "s3://bucket/prefix/run/model?endpoint_override=http://h:9000&secret_key=abc"
    assert "abc" not in storage.redact(uri) and "endpoint_override=http://h:9000" in storage.redact(uri)
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote(f"file://{tmp_path}")


def test_scratch_dir_removes_what_dead_processes_of_this_host_left(tmp_path):
    import socket
    import subprocess
    import sys

    host = socket.gethostname()
    final = tmp_path / "abc123"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"abc123.tmp-{host}-{int(gone.stdout)}"  # a preparation killed mid-write
    live = tmp_path / f"abc123.tmp-{host}-{os.getppid()}"  # another run, still writing
    elsewhere = tmp_path / f"abc123.tmp-other-host-{int(gone.stdout)}"  # a node's, on a shared disk
    other_key = tmp_path / f"abc1234.tmp-{host}-{int(gone.stdout)}"
    for d in (dead, live, elsewhere, other_key):
        (d / "part").mkdir(parents=True)
    tmp = storage.scratch_dir(final)
    assert tmp == tmp_path / f"abc123.tmp-{host}-{os.getpid()}" and not tmp.exists()
    assert not dead.exists()
    assert live.exists() and elsewhere.exists() and other_key.exists()


def test_run_root_and_driver_dir(tmp_path):
    unset = RunConfig(output_dir=str(tmp_path / "runs"))
    assert storage.run_root(unset, "r") == str(tmp_path / "runs" / "r") == str(storage.local_run_dir(unset, "r"))
    shared = RunConfig(output_dir=str(tmp_path / "runs"), storage_path=str(tmp_path / "shared"))
    assert storage.run_root(shared, "r") == str(tmp_path / "shared" / "r")  # everything under storage_path
    assert storage.local_run_dir(shared, "r") == tmp_path / "shared" / "r"
    remote = RunConfig(output_dir=str(tmp_path / "runs"), storage_path="s3://b/p?region=x")
    assert storage.run_root(remote, "r") == "s3://b/p/r?region=x"
    assert storage.local_run_dir(remote, "r") == tmp_path / "runs" / "r"  # the driver's staging copy


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_round_trip(where, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDPO_STORAGE_CACHE", str(tmp_path / "cache"))
    root = str(tmp_path / "root") if where == "local" else s3.uri(f"roundtrip-{os.getpid()}")
    storage.write_text(storage.join(root, "a", "x.json"), json.dumps({"k": 1}))
    assert storage.exists(storage.join(root, "a", "x.json"))
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert storage.read_json(storage.join(root, "missing.json"), default="none") == "none"
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"\x00" * 1000)
    storage.upload(model, storage.join(root, "model"))
    back = storage.download(storage.join(root, "model"), tmp_path / "back")
    assert (back / "sub" / "w.bin").read_bytes() == b"\x00" * 1000
    local = storage.localize(storage.join(root, "model"))
    assert (Path(local) / "config.json").read_text() == "{}"
    if where == "s3":
        assert local.startswith(str(tmp_path / "cache"))
        assert storage.localize(storage.join(root, "model")) == local  # fetched once
        storage.write_text(storage.join(root, "model", "config.json"), '{"changed": true}')
        again = storage.localize(storage.join(root, "model"))
        assert again != local and json.loads((Path(again) / "config.json").read_text()) == {"changed": True}
    else:
        assert local == storage.resolve(storage.join(root, "model"))[1]  # used in place
    with pytest.raises(storage.StorageError, match="nothing at"):
        storage.localize(storage.join(root, "nope")) if where == "s3" else storage.download(
            storage.join(root, "nope"), tmp_path / "x")


def test_a_tokenizer_is_fetched_without_the_weights(s3, tmp_path, monkeypatch):
    """What a driver needs to tokenize: a model directory's files that are not weights (a 7B
    model's ~13 GB stay in the store); local paths and hub ids pass through."""
    monkeypatch.setenv("SAFEDPO_STORAGE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    (model / "checkpoint_1").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (model / name).write_text(name)
    for name in ("model.safetensors", "pytorch_model.bin", "checkpoint_1/x.pt"):
        (model / name).write_bytes(b"\x00" * 100)
    uri = s3.uri(f"light-{os.getpid()}")
    storage.upload(model, uri)
    light = Path(storage.localize_light(uri))
    assert sorted(p.name for p in light.iterdir()) == ["config.json", "tokenizer.json", "tokenizer.model",
                                                      "tokenizer_config.json"]
    assert (light / "tokenizer.model").read_text() == "tokenizer.model"
    assert storage.localize_light(uri) == str(light)  # fetched once
    assert storage.localize_light(str(model)) == str(model)
    assert storage.localize_light("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def _log(outputs: storage.RunOutputs, step: int, **extra) -> None:
    outputs.append("metrics.jsonl", {"step": step, **extra})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_logs_follow_the_checkpoint_they_resume_from(where, s3, tmp_path):
    """A first attempt logs steps 1–5 and checkpoints at 2 and 4, then dies after logging 5 and an
    evaluation at 4 that came after its checkpoint; the attempt resuming from 4 sees the logs cut
    back to exactly what they held at checkpoint 4 (on an object store: through its staging dir)."""
    root = str(tmp_path / "run") if where == "local" else s3.uri(f"marks-{os.getpid()}/run")
    first = storage.RunOutputs(root, name="run")
    first.restore(0)
    _log(first, 0, **{"eval/loss": 1.0})
    for step in (1, 2, 3, 4):
        _log(first, step, loss=float(step))
        first.append("pairs.jsonl", {"step": step, "pair_ids": [step]})
        if step in (2, 4):
            first.mark(step)
    _log(first, 4, **{"eval/loss": 0.5})  # after checkpoint 4: must go
    _log(first, 5, loss=5.0)
    first.push("metrics.jsonl", "pairs.jsonl")
    if where == "s3":
        assert first.local != Path(storage.resolve(root)[1])  # rank 0 wrote into a staging dir

    second = storage.RunOutputs(root, name="run")  # a new attempt, maybe on another node
    second.restore(4)
    records = [json.loads(l) for l in (second.local / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in records] == [(0, False), (1, True), (2, True), (3, True), (4, True)]
    assert [json.loads(l)["step"] for l in (second.local / "pairs.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    _log(second, 5, loss=5.0)
    second.finish()
    final = [json.loads(l)["step"] for l in storage.read_text(storage.join(root, "metrics.jsonl")).splitlines()]
    assert final == [0, 1, 2, 3, 4, 5]
    if where == "s3":
        assert not second.local.exists()  # staging dropped after the upload

    fresh = storage.RunOutputs(root, name="run")  # a restart with no checkpoint: nothing kept
    fresh.restore(0)
    assert (fresh.local / "metrics.jsonl").read_text() == ""


def test_multi_node_cluster_needs_shared_storage(tmp_path):
    one, two = [{"NodeID": "a"}], [{"NodeID": "a"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.2"}]
    storage.check_cluster_storage(RunConfig(), nodes=one)  # one machine: the run directory is fine
    with pytest.raises(storage.StorageError, match=r"2 nodes and run.storage_path is unset.*s3://BUCKET"):
        storage.check_cluster_storage(RunConfig(), nodes=two)
    never = lambda path, nodes: pytest.fail("an object store needs no probe")  # noqa: E731
    storage.check_cluster_storage(RunConfig(storage_path="s3://b/p"), nodes=two, probe=never)
    calls = []
    shared = lambda path, nodes: calls.append(path) or []  # noqa: E731
    storage.check_cluster_storage(RunConfig(storage_path=str(tmp_path)), nodes=two, probe=shared)
    assert calls == [str(tmp_path)]
    node_local = lambda path, nodes: ["b (10.0.0.2)"]  # noqa: E731
    with pytest.raises(storage.StorageError, match=r"node-local path.*b \(10.0.0.2\).*run.storage_path="):
        storage.check_cluster_storage(RunConfig(storage_path=str(tmp_path)), nodes=two, probe=node_local)


def test_probe_sees_a_shared_path(ray_local, tmp_path):
    """The real probe: every node of this (one-node) Ray sees a marker written here."""
    assert storage.probe_shared(str(tmp_path), storage.alive_nodes()) == []
    assert not list(tmp_path.glob(".safedpo-shared-check-*"))  # marker removed


@pytest.mark.parametrize("override, message", [
    ("run.storage_path=ftp://host/x", "'run.storage_path': unsupported scheme 'ftp://'"),
    ("run.node_wait_timeout_s=0", "'run.node_wait_timeout_s' must be > 0"),
    ("run.worker_resources={GPU: 1}", "'run.worker_resources.GPU'"),
    ("run.worker_resources={slot: -1}", "'run.worker_resources.slot' must be >= 0"),
    ("run.worker_resources=slot", "'run.worker_resources' must be a mapping"),
])
def test_cluster_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_cluster_keys_load():
    cfg = load_config(None, ["run.storage_path=gs://bucket/runs", "run.worker_resources={slot: 1, 'accelerator_type:A100': 0.001}",
                             "run.node_wait_timeout_s=300", "train.record_pairs=true"])
    assert cfg.run.worker_resources == {"slot": 1.0, "accelerator_type:A100": 0.001}
    assert cfg.run.node_wait_timeout_s == 300.0 and cfg.train.record_pairs


def test_node_wait_timeout_and_message(monkeypatch):
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    from safedpo_ray.train import faults

    monkeypatch.setenv(faults.TIMEOUT_ENV, "60")
    cfg = load_config(None, ["run.name=r1", "run.max_failures=3"])
    assert faults.node_wait_timeout_s(cfg) == 60.0  # unset: the environment's
    cfg = load_config(None, ["run.name=r1", "run.max_failures=3", "run.node_wait_timeout_s=15"])
    cfg.run.storage_path = "s3://b/p?secret_key=hush"  # a config refuses it (secret_guard); a message must hide it anyway
    fc = faults.failure_config(cfg)
    assert fc.max_failures == 3 and fc.controller_failure_limit == 0
    assert os.environ[faults.TIMEOUT_ENV] == "15"  # what Ray Train reads (and propagates)
    err = faults.explain(cfg, ControllerError(WorkerGroupStartupTimeoutError(2)))
    assert isinstance(err, faults.NodesDidNotComeBack)
    assert "run.node_wait_timeout_s=15 s" in str(err) and "run.resume=true run.name=r1" in str(err)
    assert "hush" not in str(err)
    other = RuntimeError("boom")
    assert faults.explain(cfg, other) is other


@pytest.mark.timeout(300)
def test_evaluate_a_run_in_the_store_into_the_store(ray_local, s3, tmp_path, monkeypatch, capsys):
    """`evaluate --model s3://.../RUN --output s3://...`: the run's model and reference come from the
    store (not its checkpoints), results.json goes back to it."""
    from safedpo_ray.cli.main import main
    from safedpo_ray.data.synthetic import make_synthetic_rows
    from safedpo_ray.models.loading import build_tiny_model

    monkeypatch.setenv("SAFEDPO_STORAGE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    rows = make_synthetic_rows(32, seed=0, split="train")
    init = build_tiny_model(run / "init-model", [r[k] for r in rows for k in ("prompt", "response_0", "response_1")],
                            seed=0)
    storage.upload(init, storage.join(s3.uri("eval-src"), "r1", "model"))
    storage.upload(init, storage.join(s3.uri("eval-src"), "r1", "init-model"))
    storage.write_text(storage.join(s3.uri("eval-src"), "r1", "checkpoint_000", "huge.pt"), "x")
    out = s3.uri("eval-out")
    assert main(["evaluate", "--model", storage.join(s3.uri("eval-src"), "r1"), "--data", "synthetic",
                 "--output", out, "--name", "e1", "data.synthetic_prompts=8", "data.max_prompts=4",
                 "generation.enabled=false", "output.progress=false"]) == 0
    results = json.loads(storage.read_text(storage.join(out, "e1", "results.json")))
    (label,) = results["models"]
    assert results["models"][label]["implicit"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    # the driver (this process) fetched nothing: the implicit-metrics task got the model and its
    # reference as URIs and fetched them into its own node's cache
    assert not (tmp_path / "cache").exists()
    assert results["models"][label]["model"]["path"] == storage.join(s3.uri("eval-src"), "r1", "model")


def test_resolve_a_run_in_the_store_without_downloading(s3, tmp_path, monkeypatch):
    """A run, its model/ and a LoRA run in the store resolve to URIs (read: listings, config.yaml,
    adapter_config.json); no weights reach this process's disk: the actors fetch them on their nodes."""
    from safedpo_ray.models.resolve import EvalError, resolve_model, tokenizer_source

    monkeypatch.setenv("SAFEDPO_STORAGE_CACHE", str(tmp_path / "cache"))
    base = s3.uri(f"resolve-{os.getpid()}")
    for part in ("run1/model", "run1/init-model", "run2/model"):
        storage.write_text(storage.join(base, part, "config.json"), "{}")
        storage.write_text(storage.join(base, part, "model.safetensors"), "weights")
    storage.write_text(storage.join(base, "run2", "config.yaml"), "model:\n  name_or_path: org/base-7b\n")
    run = storage.join(base, "run1")
    spec = resolve_model(run)
    assert (spec.label, spec.path, spec.reference, spec.run_dir) == (
        "run1", storage.join(run, "model"), storage.join(run, "init-model"), run)
    assert resolve_model(storage.join(run, "model")).reference == storage.join(run, "init-model")
    assert resolve_model(storage.join(run, "init-model")).reference is None  # a plain model dir
    assert resolve_model(storage.join(base, "run2")).reference == "org/base-7b"

    lora = storage.join(base, "lora-run")
    storage.write_text(storage.join(lora, "init-model", "config.json"), "{}")
    storage.write_text(storage.join(lora, "model", "adapter", "adapter_config.json"),
                       json.dumps({"base_model_name_or_path": "/training/node/path/init-model"}))
    storage.write_text(storage.join(lora, "model", "adapter", "tokenizer_config.json"), "{}")
    spec = resolve_model(lora, label="lora")
    assert spec.adapter == storage.join(lora, "model", "adapter") and spec.path == storage.join(lora, "init-model")
    assert spec.reference is None and tokenizer_source(spec) == spec.adapter
    storage.write_text(storage.join(base, "not-a-model", "notes.txt"), "x")
    with pytest.raises(EvalError, match="no config.json"):
        resolve_model(storage.join(base, "not-a-model"))
    with pytest.raises(EvalError, match="nothing at"):
        resolve_model(storage.join(base, "nothing-here"))
    assert not (tmp_path / "cache").exists()  # nothing was downloaded


def test_file_uri_is_a_local_root(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path / "runs"), storage_path=f"file://{tmp_path}/shared")
    assert storage.local_run_dir(cfg, "r") == tmp_path / "shared" / "r"  # written in place, no staging
    assert not storage.RunOutputs(storage.run_root(cfg, "r")).remote


def test_a_local_model_on_a_multi_node_cluster_must_be_seen_by_every_node(tmp_path):
    one, two = [{"NodeID": "a"}], [{"NodeID": "a"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.2"}]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    never = lambda path, nodes: pytest.fail("nothing to probe")  # noqa: E731
    storage.check_cluster_inputs({"model.name_or_path": str(model)}, nodes=one, probe=never)  # one machine
    for value in ("s3://b/model", "meta-llama/Llama-2-7b-hf", None):  # fetched or downloaded on each node
        storage.check_cluster_inputs({"model.name_or_path": value}, nodes=two, probe=never)
    calls = []
    shared = lambda path, nodes: calls.append(path) or []  # noqa: E731
    storage.check_cluster_inputs({"model.name_or_path": str(model)}, nodes=two, probe=shared)
    assert calls == [str(model.resolve())]
    node_local = lambda path, nodes: ["b (10.0.0.2)"]  # noqa: E731
    with pytest.raises(storage.StorageError, match=r"model.name_or_path='.*model' is on this machine's disk only: "
                                                   r"1 of the 2 nodes.*b \(10.0.0.2\).*model.name_or_path=s3://"):
        storage.check_cluster_inputs({"model.name_or_path": str(model)}, nodes=two, probe=node_local)


def test_the_files_a_node_sees_are_compared_by_name_and_size(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"1234")
    assert storage._listing(str(model)) == [("config.json", 2), ("sub/w.bin", 4)]
    assert storage._listing(str(model / "config.json")) == [("config.json", 2)]
    assert storage._listing(str(tmp_path / "absent")) is None


def test_evaluate_refuses_a_model_or_scorer_on_one_machines_disk_of_a_cluster(tmp_path, monkeypatch):
    """evaluate's generation and scoring actors load models on any node: on a cluster of several
    nodes a local model or score model must look the same on every node, else one sentence."""
    from types import SimpleNamespace

    from safedpo_ray.evaluate.runner import Evaluation
    from safedpo_ray.models.resolve import ModelSpec

    model, cost = tmp_path / "model", tmp_path / "cost"
    for d in (model, cost):
        d.mkdir()
        (d / "config.json").write_text("{}")
    monkeypatch.setattr(storage, "alive_nodes", lambda: [{"NodeID": "a"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.2"}])
    asked = []

    def answers(fn, args, expected, nodes, timeout_s):
        asked.append(args[0])
        return [] if args[0] == str(model) else ["b (10.0.0.2)"]  # the model on a shared mount, the scorer not

    monkeypatch.setattr(storage, "_nodes_not_answering", answers)
    ev = SimpleNamespace(cfg=SimpleNamespace(scoring=SimpleNamespace(cost_model=str(cost), reward_model=None)),
                         specs=[ModelSpec(label="m", path=str(model))])
    with pytest.raises(storage.StorageError, match=r"scoring.cost_model='.*cost' is on this machine's disk only: "
                                                   r"1 of the 2 nodes.*scoring.cost_model=s3://"):
        Evaluation._check_inputs_reach_every_node(ev)
    ev.cfg.scoring.cost_model = "s3://bucket/cost"  # fetched on each node: nothing to ask
    Evaluation._check_inputs_reach_every_node(ev)
    assert asked == [str(cost), str(model)]
    ev.specs = [ModelSpec(label="m", path=str(model), reference=str(cost))]
    with pytest.raises(storage.StorageError, match=r"model.reference='.*cost' is on this machine's disk only"):
        Evaluation._check_inputs_reach_every_node(ev)


def test_a_data_source_in_the_store_with_options_in_its_query(s3):
    """data.source as the store's URI with its options (endpoint, region) in the query: a
    directory of shards, one file and a glob all resolve (the query's '?' is no glob character)."""
    from safedpo_ray.data.files import resolve_files

    for i in range(3):
        storage.write_text(storage.join(s3.uri("src/shards"), f"part-{i}.jsonl"), '{"prompt": "p"}\n' * (i + 1))
    files = resolve_files(s3.uri("src/shards"))
    assert [f.uri for f in files] == [storage.join(s3.uri("src/shards"), f"part-{i}.jsonl") for i in range(3)]
    assert [f.size for f in files] == [16, 32, 48]
    (one,) = resolve_files(storage.join(s3.uri("src/shards"), "part-1.jsonl"))
    assert one.size == 32
    assert len(resolve_files(storage.join(s3.uri("src/shards"), "part-*.jsonl"))) == 3
