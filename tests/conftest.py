import os
import sys
import time
import warnings

import pytest

SESSION_CPUS = 4
_capture = None  # pytest's capture manager: what the fixtures below say reaches the terminal


def pytest_configure(config):
    global _capture
    _capture = config.pluginmanager.getplugin("capturemanager")


FIRST = ("test_isolated_cluster.py",)
"""Files collected first: with `-n 2 --dist loadfile` (pyproject.toml) each file runs whole on one of
two workers, in collection order, so the longest (the cluster module, ~10 min alone) starts at once
on one worker while the other runs the rest."""


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: 0 if item.path.name in FIRST else 1)  # stable: the rest keep their order


def _say(message: str, *, warn: bool = False) -> None:
    """To the terminal; `warn`: also a warning of the running test, which reaches the summary
    from an xdist worker too (a worker's terminal output does not)."""
    if warn:
        warnings.warn(message, pytest.PytestWarning, stacklevel=2)
    if _capture is None:
        sys.stderr.write(message + "\n")
        return
    with _capture.global_and_fixture_disabled():
        sys.stderr.write("\n" + message + "\n")


def _start_session_ray():
    """The session's local Ray with SESSION_CPUS logical CPUs. A Ray left running by a test that
    started its own (a command run in-process starts one with the machine's CPUs, 2 here) is
    replaced: on 2 CPUs two training workers leave Ray Data none and an SFT run waits forever."""
    import ray

    from safedpo_ray.config.training import RunConfig
    from safedpo_ray.runtime.ray_env import ensure_ray

    if ray.is_initialized():
        if ray.cluster_resources().get("CPU") == SESSION_CPUS:
            return
        _say(f"[conftest] a Ray with {ray.cluster_resources().get('CPU')} CPUs was left running; "
             f"restarting the session's Ray with {SESSION_CPUS}", warn=True)
        ray.shutdown()
    ensure_ray(RunConfig(num_workers=2, local_num_cpus=SESSION_CPUS))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs ~4 s)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    # The fake credentials of the tests' S3 store (tests/s3_server.py), for Ray's workers too.
    from s3_server import CREDENTIALS

    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
    _start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _shared_ray_is_left_clean(request):
    """A test on the shared Ray finds it with its CPUs and leaves it as it found it: its CPUs free,
    no placement group or actor of its own still alive, the default Ray Data context. A leak is
    named on stderr (it would otherwise surface as a later test waiting forever for CPUs) and then
    cleaned up. A test without the shared Ray that started a Ray of its own has it shut down."""
    import ray

    if "ray_local" not in request.fixturenames:
        was_up = ray.is_initialized()
        yield
        if not was_up and ray.is_initialized():
            ray.shutdown()
        return
    from ray.data import DataContext
    from ray.util.placement_group import PlacementGroup

    _start_session_ray()
    before = {a for a, v in ray._private.state.actors().items() if v["State"] == "ALIVE"}
    yield
    DataContext._set_current(DataContext())
    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0)
    if free >= total:
        return
    groups = [g for g, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"]
    actors = {a: v for a, v in ray._private.state.actors().items()
              if v["State"] == "ALIVE" and a not in before and not v["IsDetached"]}
    _say(
        f"[leak] {request.node.nodeid} left {total - free:g} of {total:g} CPUs taken: "
        f"{len(groups)} placement group(s), actors {sorted(v['ActorClassName'] for v in actors.values())};"
        " removing them", warn=True)
    for g in groups:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g))))
    worker = ray._private.worker.global_worker
    for a in actors:
        try:
            worker.core_worker.kill_actor(ray.ActorID(bytes.fromhex(a)), True)
        except Exception as e:  # noqa: BLE001 - a cleanup: the actor may be gone already
            _say(f"[leak] could not kill actor {a}: {e}")
