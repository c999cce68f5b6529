"""A Ray cluster on 127.0.0.1 that looks like a real one: its nodes share no disk.

    with IsolatedCluster(hide=[job_dir], env=CREDENTIALS) as cluster:   # head + 2 worker nodes
        cluster.dashboard        # http://127.0.0.1:PORT (submit jobs here)
        cluster.remove()         # kill the oldest worker node (SIGKILL to all its processes),
        cluster.remove(node_id)  # ... or that one
        cluster.add()            # a new worker node

* The head runs no work (`--num-cpus=0`, as KubeRay's raycluster.yaml): every task, actor and
  train worker runs on a worker node; job drivers run on the head.
* Each worker node is a `ray start --block` inside its own mount namespace (`unshare -m
  --propagation private`) in which the head's directory (its HOME, Ray temp dir and TMPDIR), the
  other worker nodes' directories that exist when it starts, and the paths in `hide` (the
  directory a test submits from, its tmp_path) are empty tmpfs mounts: a path the head (or the
  test) wrote is not there on a worker node, as on a real cluster. Every node has its own HOME
  (so its own storage cache, ~/.cache/safedpo-ray/storage) and TMPDIR.
* Storage shared by the nodes is an object store (tests/s3_server.py); its credentials go in
  `env`, the environment of every `ray start` (never in a job's runtime_env).
* Cleanup always runs: every node was started in its own session, and closing stops each
  `ray start` with SIGTERM, then SIGKILLs whatever is left in those sessions.

Where `unshare -m` is refused (no CAP_SYS_ADMIN, seccomp), `unshare_refused()` says why and the
tests skip. Recipe and pitfalls: /work/shared/STACK-NOTES.md, "A cluster whose nodes share no disk".
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_CPUS = 3  # 2 training workers + Ray Data tasks per node (logical CPUs; the machine has 2 cores)
OBJECT_STORE = str(150 * 1024 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unshare_refused() -> str | None:
    """None when a private mount namespace with a tmpfs mount works here, else the reason."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = tempfile.mkdtemp(prefix="ic-probe")
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs none {probe} && touch {probe}/x"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"unshare -m / mount -t tmpfs refused: {(r.stderr or r.stdout).strip()}"
        if os.path.exists(os.path.join(probe, "x")):
            return "a tmpfs mounted in a private mount namespace leaked into this one"
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class NodeError(RuntimeError):
    pass


class Node:
    def __init__(self, name: str, root: Path, proc: subprocess.Popen, log: Path):
        self.name, self.root, self.proc, self.log = name, root, proc, log
        self.node_id: str | None = None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


class IsolatedCluster:
    def __init__(self, *, hide: list[str | os.PathLike] = (), env: dict[str, str] | None = None,
                 workers: int = 2, worker_cpus: int = WORKER_CPUS, start_timeout: float = 240):
        self.hide = [str(Path(p).resolve()) for p in hide]
        self.extra_env = dict(env or {})
        self.n_workers, self.worker_cpus, self.start_timeout = workers, worker_cpus, start_timeout
        self.base = Path(tempfile.mkdtemp(prefix="ic", dir="/tmp"))  # short: Unix socket paths live under it
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._all: list[Node] = []
        self._count = 0
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    # ----------------------------------------------------------------------------------- layout
    def _dirs(self, name: str) -> Path:
        root = self.base / name
        for sub in ("home", "ray", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return root

    def _env(self, root: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "SAFEDPO_STORAGE_CACHE", "SAFEDPO_STAGING_DIR"))}
        env.update(self.extra_env)
        env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), RAY_AUTH_MODE="disabled",
                   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER must stay unset: with it `ray start --address` aborts.
        return env

    @property
    def head_dir(self) -> Path:
        return self.base / "h"

    # ----------------------------------------------------------------------------------- nodes
    def _start(self, name: str, argv: list[str], mounts: list[str]) -> Node:
        root = self._dirs(name)
        log = self.base / f"{name}.log"
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={root / 'ray'}",
               f"--dashboard-agent-listen-port={free_port()}", f"--object-store-memory={OBJECT_STORE}", *argv]
        if mounts:
            script = " && ".join(f"mount -t tmpfs none '{m}'" for m in mounts) + " && exec " + " ".join(
                f"'{c}'" for c in cmd)
            cmd = ["unshare", "-m", "--propagation", "private", "bash", "-c", script]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=self._env(root), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(root), start_new_session=True)
        node = Node(name, root, proc, log)
        self._all.append(node)
        return node

    def _alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        from safedpo_ray.cli.jobs import _address_wins

        try:
            # Ray's state client takes RAY_API_SERVER_ADDRESS over the address it is given: a local
            # Ray that this test session started (ray_local) set it, and would be asked instead.
            with _address_wins():
                nodes = list_nodes(address=self.dashboard, raise_on_missing_output=False, timeout=10)
            return [n for n in nodes if str(getattr(n, "state", "")) == "ALIVE"]
        except Exception:
            return []

    def _wait_for(self, node: Node, *, head: bool) -> str:
        deadline = time.time() + self.start_timeout
        known = {n.node_id for n in self._all if n.node_id}
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise NodeError(f"node {node.name} exited with code {node.proc.returncode} while starting:\n{node.tail()}")
            for n in self._alive_nodes():
                if n.node_id in known:
                    continue
                if bool(n.is_head_node) == head:
                    node.node_id = n.node_id
                    return n.node_id
            time.sleep(1)
        raise NodeError(f"node {node.name} did not join the cluster in {self.start_timeout:.0f} s:\n{node.tail()}")

    def start_head(self) -> None:
        self.head = self._start("h", ["--head", "--num-cpus=0", f"--port={self.gcs_port}",
                                      "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                      f"--dashboard-port={self.dashboard_port}"], mounts=[])
        self._wait_for(self.head, head=True)

    def add(self) -> str:
        """Start a worker node in its own mount namespace; returns its node id."""
        name = f"w{self._count}"
        self._count += 1
        others = [str(self.base / n.name) for n in self._all if n.name != name]
        node = self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={self.worker_cpus}",
                                  f"--resources={{\"worker_node\": 1, \"{name}\": 1}}"],
                           mounts=[*others, *self.hide])
        self.workers.append(node)
        return self._wait_for(node, head=False)

    def remove(self, node_id: str | None = None) -> str:
        """Kill a worker node (every process of it, SIGKILL: a lost machine): the one with this
        Ray node id, else the oldest. Returns its node id."""
        node = next(w for w in self.workers if node_id in (None, w.node_id))
        self.workers.remove(node)
        self._kill(node)
        return node.node_id or node.name

    def _kill(self, node: Node) -> None:
        """SIGKILL every process of the node (its session)."""
        sid = node.proc.pid  # start_new_session: the session id is the first process's pid
        for pid in _session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    # ----------------------------------------------------------------------------------- life
    def __enter__(self) -> "IsolatedCluster":
        try:
            self.start_head()
            for _ in range(self.n_workers):
                self.add()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # Every node asked to stop at once (`ray start --block` stops its node's processes on
        # SIGTERM), 10 s for all of them, then whatever is left of their sessions is killed:
        # one node after another with 30 s each took ~30 s of every module's teardown.
        running = [n for n in self._all if n.proc.poll() is None]
        for node in running:
            node.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for node in running:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for node in reversed(self._all):
            self._kill(node)
        shutil.rmtree(self.base, ignore_errors=True)

    def worker_ids(self) -> list[str]:
        return [w.node_id for w in self.workers if w.node_id]


def _session_members(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (a node started with start_new_session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids
