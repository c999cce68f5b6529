"""Connecting to Ray: a cluster when an address is given, else a local Ray sized for the job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from safedpo_ray.config.training import RunConfig



@dataclass(frozen=True)
class RayRequest:
    """What a command asks of Ray when it is not a training run (a RunConfig has these fields too):
    where, and how many workers or actors of how many CPUs, on GPUs or not."""
    address: str | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    local_num_cpus: int | None = None
    name: str | None = None


_ready_listeners: list[Callable[[Any, bool], None]] = []
_started_here = False  # this process called ray.init (a local Ray it started, or a cluster it joined)


def started_here() -> bool:
    """Whether this process started (or joined) the Ray it is connected to: the one answer to
    "is Ray ours to stop" for the console, the signal guard and the commands."""
    return _started_here


def on_ready(listener: Callable[[Any, bool], None]) -> None:
    """Call `listener(run, started)` whenever `ensure_ray` finds Ray up (`started`: that call
    started or connected it). The console listens, to route the workers' output."""
    if listener not in _ready_listeners:
        _ready_listeners.append(listener)


def _ready(run: Any, started: bool) -> None:
    global _started_here
    _started_here = _started_here or started
    for listener in list(_ready_listeners):
        listener(run, started)

# Environment that made Ray Train + DeepSpeed quiet and reliable on CPU (see docs/training.md, "CPU notes").
LOCAL_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # each ray.train.report otherwise blocks ~1.5 s
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
}


def worker_env(use_gpu: bool) -> dict[str, str]:
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "safedpo-ray" / "torch_extensions"))
    return env


def ensure_ray(run: RunConfig | RayRequest, *, dashboard: bool = True) -> None:
    """ray.init once: the configured address, RAY_ADDRESS, or a local Ray with spare CPUs.

    A local Ray gets more logical CPUs than the workers reserve, so Ray Data tasks can run beside
    two 1-CPU train workers on a 2-core machine (else they wait forever for a free CPU).
    `dashboard=False`: a local Ray for a command that runs no Ray Train (`prepare`) starts without
    the dashboard (below), whose processes took 6-7% of the CPU time of a preparation.
    """
    import ray

    if ray.is_initialized():
        _ready(run, False)
        return
    for k, v in {**LOCAL_ENV, **worker_env(run.use_gpu)}.items():
        os.environ.setdefault(k, v)
    global _local_cores
    address = run.address or os.environ.get("RAY_ADDRESS")
    if address:
        _local_cores = None
        ray.init(address=address, log_to_driver=True)
        _ready(run, True)  # workers' output: ours on the console, the rest to a file
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray needs no token
    _bind_loopback()
    # The workers' environment goes through this process's (the local raylet and its workers are
    # its children), not a job runtime_env: with one, no prestarted worker could run our tasks and
    # each first task or actor waited ~1 s for a worker made by the runtime-env agent.
    os.environ.update(worker_env(run.use_gpu))
    # One machine: none of this Ray's nodes can be drained or preempted apart from the machine
    # itself, so Ray Train's preemption watcher (an actor per run: ~2 s of CPU and ~1 s of each
    # run's start-up here) is off. On a cluster it stays on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    needed = int(run.num_workers * run.cpus_per_worker) + 2
    num_cpus = run.local_num_cpus or max(os.cpu_count() or 1, needed)
    # Ray Train's placement-group cleaner asks the state API (served by the dashboard) whether the
    # controller lives. Without a dashboard it warns every few seconds; with two local Ray
    # instances on one machine (two users, a test beside a run) it may ask the wrong one, be told
    # the controller is gone, and remove our placement group, killing the run. So: a dashboard on
    # a port we choose, and that address pinned for every process of this job.
    if not dashboard:
        ray.init(num_cpus=num_cpus, log_to_driver=True, include_dashboard=False)
        _local_cores = os.cpu_count() or 1
        _ready(run, True)
        return
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, log_to_driver=True, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port)
    _local_cores = os.cpu_count() or 1
    _ready(run, True)


_local_cores: int | None = None  # set when this process started a local Ray


def shutdown() -> None:
    """`ray.shutdown()`, after SIGKILLing the autoscaler monitor of a Ray this process started:
    on SIGTERM the monitor sleeps out its update interval and Ray waits 1 s for it before killing
    it anyway (measured here: 1.5 s at the end of every command, 0.45 s with this). A cluster we
    only connected to is left to `ray.shutdown`, which disconnects."""
    import ray

    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is not None and node.is_head():
            node._kill_process_type(ray_constants.PROCESS_TYPE_MONITOR, check_alive=False, allow_graceful=False,
                                    wait=False)
    except Exception:  # noqa: BLE001  (Ray's internals moved: plain ray.shutdown)
        pass
    ray.shutdown()
    global _started_here
    _started_here = False


def parallel_cpus(free: float) -> int:
    """How many 1-CPU tasks may run at once for CPU-bound work (data preparation): the CPUs free
    now, but on a local Ray (whose logical CPUs outnumber the cores, see `ensure_ray`) no more
    than the machine's cores; more processes only add start-up imports and switching."""
    n = max(1, int(free))
    return min(n, _local_cores) if _local_cores else n


# Without any of these (NVIDIA driver and devices, WSL's GPU, ROCm's KFD) torch.cuda.is_available()
# is False, known without importing torch at a command's start.
GPU_DEVICE_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def driver_accelerator_env() -> str | None:
    """Set DS_ACCELERATOR=cpu on a driver without CUDA, before anything imports DeepSpeed (transformers
    does, on the driver too): DeepSpeed would pick the CPU anyway, with a warning on the console.
    Returns the variable set (None: it was set already, or CUDA is there and detected silently)."""
    if "DS_ACCELERATOR" in os.environ:
        return None
    if any(os.path.exists(p) for p in GPU_DEVICE_PATHS):  # a GPU may be there: ask torch (seconds)
        import torch

        if torch.cuda.is_available():
            return None
    os.environ["DS_ACCELERATOR"] = "cpu"
    return "DS_ACCELERATOR"


def _bind_loopback() -> None:
    """A local Ray listens on 127.0.0.1 only (without this its GCS, raylet, agents and workers
    listened on 0.0.0.0/:: and took the machine's network address as the node's). Ray picks the
    node address with `services.get_node_ip_address()`, which is 127.0.0.1 when
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; the flag is read once, when ray is imported
    (`ray_constants.ENABLE_RAY_CLUSTER`), so it is set in the environment (Ray's own processes) and in
    the imported module. An explicit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 is left alone."""
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    if os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def _free_port() -> int:
    """A free port for the dashboard, never one of Ray's fixed defaults: the dashboard agent
    listens on 52365 by default, and `ray.init` refuses a dashboard port equal to it (seen here
    once, when the system handed out 52365)."""
    import socket

    from ray._private import ray_constants

    taken = {ray_constants.DEFAULT_PORT, ray_constants.DEFAULT_DASHBOARD_PORT,
             ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT}
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
