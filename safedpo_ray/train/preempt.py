"""Stopping a run on a signal: save a checkpoint, stop our Ray processes, say how to continue.

    safedpo-ray train ... &  kill -TERM $!     # or Ctrl-C: checkpoint, then exit 143 (130)
    safedpo-ray train ... run.resume=true run.name=NAME    # continues from that checkpoint

Driver (`command_guard`, around a whole CLI command):
- The first SIGTERM/SIGINT while the workers train writes a stop marker, `STOP_REQUESTED.json`,
  into the run root (a local path, a shared filesystem or an object store: wherever rank 0
  writes). Rank 0 reads it after each step, the ranks agree through one all-reduce (so
  collectives stay in step, ZeRO-3 too), save a checkpoint and return `stopped_early`. The driver
  then shuts down the Ray it started and exits 128 + signal (143, 130) with one line saying how to
  continue. `trainer.fit()` runs in a thread meanwhile: the main thread keeps handling signals
  (Ray Train's own SIGINT handler, which aborts without a checkpoint, is only installed on the
  main thread).
- A second signal, or `run.stop_timeout_s` passing without the workers stopping, stops at once:
  our processes are killed, the run keeps its previous checkpoint.
- A signal before training starts (data preparation, the reference pass) stops at once too.
- At the end of the command, whatever happened: a local Ray we started is shut down, and any
  process we started that is still alive afterwards is killed (the driver is a child subreaper,
  so a Ray worker whose raylet is gone is still ours to find). A cluster given by run.address or
  RAY_ADDRESS is only disconnected from, never stopped.

Workers (`StopCheck`, one call after every optimizer step, all ranks):
- the driver's stop marker (rank 0 reads it): checkpoint, end the run (`stopped_early`);
- SIGTERM to a worker process (its node is being shut down): checkpoint, then fail the attempt
  (`WorkerStopped`), so that Ray Train restarts from that checkpoint when `run.max_failures`
  allows, and otherwise the driver says how to resume; a second SIGTERM, or
  `run.stop_timeout_s` later, the worker exits as Ray's own handler would;
- Ray's notice that a worker's node is being drained (`PreemptionInfo`, e.g. a spot instance
  reclaim): a checkpoint right away, and training goes on; Ray Train restarts the group from it
  when the node goes (`FailureConfig.max_preemption_failures`, unlimited by default).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from safedpo_ray.errors import UserError
from safedpo_ray.runtime import ray_env, storage
from safedpo_ray.runtime.ray_env import shutdown

STOP_MARKER = "STOP_REQUESTED.json"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REMOTE_POLL_S = 5.0  # rank 0 reads an object-store marker at most this often
PR_SET_CHILD_SUBREAPER = 36


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def resume_hint(name: str | None) -> str:
    if name is None:  # a command without runs to resume (train-scorer)
        return "run the same command again"
    return f"continue it with the same command and run.resume=true run.name={name}"


class Stopped(UserError):
    """The run stopped on a signal after saving a checkpoint; exits 128 + the signal."""
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Interrupted(BaseException):
    """Raised in the driver's main thread to stop at once (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class WorkerStopped(RuntimeError):
    """A worker process got SIGTERM; the ranks saved a checkpoint and end this attempt."""


# --------------------------------------------------------------------------- driver


class DriverSignals:
    """The driver's signal state for one command (see the module docstring)."""
    def __init__(self, run_cfg: Any = None):
        self.run_cfg = run_cfg  # config.RunConfig: its name (set once the run directory is chosen)
        self.stop_timeout_s = float(getattr(run_cfg, "stop_timeout_s", 120.0))
        self.signum: int | None = None
        self.count = 0
        self.requested_at: float | None = None
        self.marker: str | None = None  # set while fit() runs: where the stop marker goes
        self.marker_written = False
        self.fit_done: threading.Event | None = None  # set when the fit() thread has returned
        self.trained = False  # fit() has returned
        self.waiting_for_pairs: Callable[[], bool] | None = None  # workers started before the pairs
        self.no_checkpoints: str | None = None  # a command that keeps none (train-scorer): its name

    @property
    def run_name(self) -> str | None:
        return getattr(self.run_cfg, "name", None)

    def pairs_pending(self) -> bool:
        """The workers started before their pairs, and none were announced to them yet."""
        return self.waiting_for_pairs is not None and self.waiting_for_pairs()

    def stopped_while_preparing(self) -> Interrupted:
        return Interrupted(f"{signal_name(self.signum)} received while the pairs were prepared: stopped, "
                           f"nothing to save; {resume_hint(self.run_name)}", self.signum)

    def handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.signum, self.requested_at = signum, time.monotonic()
            if self.marker is not None:
                return  # the main thread, waiting for fit(), writes the marker
            if self.trained:
                raise Interrupted(f"{signal_name(signum)} received after training ended: stopped", signum)
            if self.pairs_pending():  # the workers start (fit() not yet running) while the pairs are prepared
                raise self.stopped_while_preparing()
            raise Interrupted(f"{signal_name(signum)} received before training started: stopped, nothing "
                              f"to save; {resume_hint(self.run_name)}", signum)
        raise Interrupted(f"{signal_name(signum)} received again: stopped at once, without a new checkpoint; "
                          f"{resume_hint(self.run_name)} (from its last checkpoint)", signum)

    def poll(self) -> None:
        """Called by the main thread while fit() runs: write the marker after the first signal;
        past the deadline, stop at once."""
        if self.signum is None or self.marker is None:
            return
        if not self.marker_written:
            self.marker_written = True
            write_marker(self.marker, self.signum)  # the workers' wait for pairs ends on it too
            if self.pairs_pending():
                # Nothing trained, nothing to save: stop at once rather than wait for the workers to
                # load their model and see the marker while preparation keeps the CPUs (35 s at 200k rows).
                raise self.stopped_while_preparing()
            what = (f"stopping after this step ({self.no_checkpoints} keeps no checkpoints)" if self.no_checkpoints
                    else "saving a checkpoint after this step, then stopping")
            print(f"[safedpo] {signal_name(self.signum)} received: {what} (at most {self.stop_timeout_s:g} s; "
                  "send it again to stop at once)", flush=True)
        if time.monotonic() - (self.requested_at or 0) > self.stop_timeout_s:
            raise Interrupted(f"the run did not stop within run.stop_timeout_s={self.stop_timeout_s:g} s of "
                              f"{signal_name(self.signum)}: stopped at once; {resume_hint(self.run_name)} "
                              "(from its last checkpoint)", self.signum)


_active: DriverSignals | None = None


def write_marker(marker: str, signum: int) -> None:
    try:
        storage.write_text(marker, json.dumps({"signal": signal_name(signum), "pid": os.getpid(),
                                               "time": time.time()}))
    except Exception as exc:  # the workers will not see it; the deadline still applies
        print(f"[safedpo] warning: could not write the stop request {storage.redact(marker)}: {exc}", flush=True)


def clear_marker(marker: str) -> None:
    try:
        if storage.exists(marker):
            fs, path = storage.resolve(marker)
            fs.delete_file(path)
    except Exception:
        pass


def set_child_subreaper() -> bool:
    """Orphaned descendants (a Ray worker whose raylet died) become our children, not init's,
    so they can still be found and stopped (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except Exception:
        return False


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def live_descendants() -> list:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        return []
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def stop_descendants(timeout_s: float) -> list[str]:
    """Wait up to `timeout_s` for our descendant processes to exit, then kill the rest; returns
    the names of those killed."""
    deadline = time.monotonic() + timeout_s
    alive = live_descendants()
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        _reap_zombies()
        alive = live_descendants()
    killed: list[str] = []
    # Several sweeps: a process killed while it forked (a raylet starting a worker) leaves a child
    # that the sweep before did not see (seen once: a Ray worker left running at exit).
    for _ in range(5):
        if not alive:
            break
        for p in alive:
            try:
                killed.append(f"{p.name()} (pid {p.pid})")
                p.kill()
            except Exception:
                continue
        time.sleep(0.1)
        _reap_zombies()
        alive = live_descendants()
    return killed


# Ray's node processes that this driver's threads talk to: a driver whose local raylet dies while
# one of its threads is inside a Ray call exits at once with code 1 ("the local Raylet is dead").
_NODE_PROCESSES = ("raylet", "gcs_server")


def exit_killing_descendants(code: int) -> None:
    """Leave now with `code`, killing every process of ours first, while threads of this process
    may still be inside Ray calls. Everything is frozen first (SIGSTOP: nothing forks any more,
    and a stopped raylet leaves those calls waiting instead of failing), everything but the
    raylet and GCS is killed and reaped, then they are killed and the process exits at once:
    killed earlier, the raylet's death made Ray end this process with code 1 before it could
    exit with `code` (seen in CI: 1 instead of 143)."""
    frozen: dict[int, Any] = {}
    for _ in range(10):  # until a pass finds nothing new: frozen processes start no others
        new = [p for p in live_descendants() if p.pid not in frozen]
        if not new:
            break
        for p in new:
            try:
                p.suspend()
            except Exception:
                pass
            frozen[p.pid] = p
    last = []
    for p in frozen.values():
        try:
            if p.name() in _NODE_PROCESSES:
                last.append(p)
                continue
            p.kill()
        except Exception:
            continue
    spared, deadline = {p.pid for p in last}, time.monotonic() + 2.0
    while time.monotonic() < deadline:
        _reap_zombies()
        if all(p.pid in spared for p in live_descendants()):
            break
        time.sleep(0.02)
    for p in last:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown_ray(ours: bool, *, timeout_s: float = 15.0) -> None:
    """When Ray was not up as the command began (`ours`): `ray.shutdown()` of the Ray it started
    (`ray_env.started_here`; or one that Ray Data or Tune started on their own meanwhile): it
    stops a local Ray, and only disconnects from a cluster; then every process of ours still alive
    after `timeout_s` is killed. Seen once in five signal runs here: a `ray::TrainController`
    whose core worker had shut down but whose process was still alive 15 s later, so
    ray.shutdown alone is not enough."""
    import ray

    if not ours:
        return
    if ray_env.started_here() or ray.is_initialized():
        try:
            shutdown()
        except Exception as exc:  # keep going: the processes are stopped below
            print(f"[safedpo] warning: ray.shutdown failed: {exc}", flush=True)
    killed = stop_descendants(timeout_s)
    if killed:
        print(f"[safedpo] stopped processes left after Ray's shutdown: {', '.join(killed)}", flush=True)


@contextmanager
def command_guard(run_cfg: Any = None) -> Iterator[DriverSignals]:
    """Around a CLI command that trains: signals ask for a checkpoint and a stop (see the module
    docstring); at the end, a Ray this command started is shut down and no process of ours is
    left. Off the main thread it does nothing; a Ray initialised before it (by a caller that owns
    it, e.g. a test session) is left running."""
    global _active
    import ray

    main = threading.current_thread() is threading.main_thread()
    owns_ray = not ray.is_initialized()
    if not main:
        yield DriverSignals(run_cfg)
        return
    if owns_ray:
        set_child_subreaper()
    guard = DriverSignals(run_cfg)
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, guard.handler)
    _active = guard
    try:
        yield guard
    except Interrupted as stop:
        # (not Thread.is_alive: a join() interrupted by an exception leaves it wrongly False)
        fitting = guard.fit_done is not None and not guard.fit_done.is_set()
        # The pairs still being prepared in a thread (the workers start meanwhile): that thread
        # would go on using Ray through the shutdown, and Ray Data starts a new local Ray for it.
        if fitting or guard.pairs_pending():
            # fit() or the preparation is still blocked inside Ray: no orderly shutdown from here.
            # Our processes are killed (a cluster ends the job's actors when this driver goes),
            # then we leave.
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            print(f"safedpo-ray: {stop}", file=sys.stderr, flush=True)
            if owns_ray:
                exit_killing_descendants(128 + stop.signum)
            sys.stdout.flush()
            os._exit(128 + stop.signum)
        _cleanup(guard, owns_ray, previous)
        raise Stopped(str(stop), stop.signum) from None
    except BaseException:
        _cleanup(guard, owns_ray, previous)
        raise
    _cleanup(guard, owns_ray, previous)


def _cleanup(guard: DriverSignals, owns_ray: bool, previous: dict) -> None:
    global _active
    # A signal during the shutdown itself must not leave it half done: ignore further ones.
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    try:
        shutdown_ray(owns_ray)
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def rearm() -> None:
    """Install the guard's handlers again: `ray.init` replaces them (a Python SIGTERM handler
    that exits, and a C++ one of its core worker that aborts the process). Call after ray.init."""
    guard = _active
    if guard is not None and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, guard.handler)


def run_fit(fit: Callable[[], Any], *, root: str) -> Any:
    """`fit()` (Ray Train's `trainer.fit()`), in a thread when a command guard is active so the
    main thread keeps handling signals; the stop marker of an earlier stop is removed first."""

    marker = storage.join(root, STOP_MARKER)
    clear_marker(marker)
    guard = _active
    if guard is None or threading.current_thread() is not threading.main_thread():
        return fit()
    rearm()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = fit()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc
        finally:
            done.set()

    guard.fit_done, guard.marker = done, marker
    threading.Thread(target=target, name="safedpo-fit", daemon=True).start()
    try:
        while not done.wait(0.2):
            guard.poll()
    finally:
        guard.marker, guard.trained = None, True
    clear_marker(marker)
    if "error" in box:
        raise box["error"]
    return box["result"]


def raise_if_stopped(summary: dict[str, Any], run_name: str | None, *, hint: str | None = None) -> None:
    """After fit(): a run that stopped because the driver was signalled ends the command with
    128 + signal and the line that says how to continue (`hint`: that line for a command that
    keeps no checkpoint)."""
    guard = _active
    if guard is None or guard.signum is None or not summary.get("stopped_early"):
        return
    if hint is not None:
        raise Stopped(f"stopped by {signal_name(guard.signum)} after step {summary.get('last_step')}; {hint}",
                      guard.signum)
    raise Stopped(f"stopped by {signal_name(guard.signum)} after step {summary.get('last_step')} with a "
                  f"checkpoint; {resume_hint(run_name)}", guard.signum)


def without_checkpoints(command: str) -> None:
    """For a command whose workers keep no checkpoints (train-scorer): a signal's message says they
    stop after their step, not that they save one."""
    if _active is not None:
        _active.no_checkpoints = command


def waiting_for_pairs(pending: Callable[[], bool]) -> None:
    """The workers start before their pairs are prepared (trainer.train_while_preparing):
    `pending()` says whether no pairs were announced to them yet; a signal meanwhile stops the
    command at once (nothing was trained)."""
    if _active is not None:
        _active.waiting_for_pairs = pending


def raise_if_signalled(run_name: str | None) -> None:
    """After fit(), when the workers stopped before training (they waited for pairs): a signal
    meanwhile ends the command with 128 + signal."""
    guard = _active
    if guard is None or guard.signum is None:
        return
    raise Stopped(f"{signal_name(guard.signum)} received before training started: stopped, nothing to save; "
                  f"{resume_hint(run_name)}", guard.signum)


def explain(run_name: str | None, error: BaseException) -> UserError | None:
    """A run that failed because a worker got SIGTERM (and saved a checkpoint first), when Ray
    Train may not restart it (run.max_failures): the message says how to continue."""
    text = str(error)
    key = WorkerStopped.__name__ + ": "
    if key not in text:
        return None
    detail = text[text.index(key) + len(key):].splitlines()[0].strip()
    return Stopped(f"{detail}; Ray Train's restarts (run.max_failures) are used up; {resume_hint(run_name)}",
                   signal.SIGTERM)


# --------------------------------------------------------------------------- workers

_worker_signal: int | None = None
_training_thread: threading.Thread | None = None  # the thread running the train loop (StopCheck's)


def install_worker_handler(grace_s: float) -> bool:
    """In a Ray Train worker's main thread: the first SIGTERM only asks for a checkpoint (read by
    `StopCheck`); a second one, or `grace_s` later, exits through Ray's own handler."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        global _worker_signal
        training = _training_thread is not None and _training_thread.is_alive()
        if _worker_signal is not None or not training:  # no loop to checkpoint: Ray's handler (exit)
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)
        _worker_signal = signum
        print(f"[safedpo] worker pid {os.getpid()}: {signal_name(signum)} received: saving a checkpoint after "
              f"this step (exiting in at most {grace_s:g} s)", flush=True)
        timer = threading.Timer(grace_s, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    return True


def worker_callbacks(grace_s: float) -> list:
    """Ray Train callbacks that install `install_worker_handler` in every worker's main thread
    (Ray Train V2's `WorkerCallback`, a developer API; none with another Ray Train)."""
    try:
        from ray.train.v2._internal.execution.callback import WorkerCallback
    except ImportError:  # pragma: no cover
        return []

    class WorkerSignals(WorkerCallback):
        def __init__(self, grace: float):
            self.grace = grace

        def after_init_train_context(self) -> None:
            install_worker_handler(self.grace)

    return [WorkerSignals(grace_s)]


def node_drain_notice() -> bool:
    """Whether Ray Train told this worker that a node of the group is being drained."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:
        return False


@dataclass
class StopRequest:
    kind: str  # "driver": end the run; "worker": end this attempt; "drain": checkpoint, go on
    reason: str

    @property
    def ends_run(self) -> bool:
        return self.kind == "driver"

    def after_checkpoint(self, step: int) -> None:
        if self.kind == "worker":
            raise WorkerStopped(f"a worker process got {self.reason} after step {step}; its checkpoint was saved")


class StopCheck:
    """The workers' side: one small all-reduce after each step tells every rank whether to save
    a checkpoint now and whether to stop (all ranks call `poll` at the same steps)."""

    def __init__(self, root: str, strategy, *, poll_interval_s: float | None = None):
        global _training_thread
        _training_thread = threading.current_thread()  # a worker SIGTERM waits for it only while it runs
        self.strategy = strategy
        self.marker = storage.join(root, STOP_MARKER)
        self.poll_interval_s = (REMOTE_POLL_S if storage.is_remote(root) else 0.0) if poll_interval_s is None \
            else poll_interval_s
        self._last_poll = float("-inf")
        self._driver_signal: str | None = None
        self._drain_saved = False

    def _driver_requested(self) -> bool:
        if self._driver_signal is not None:
            return True
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return False
        self._last_poll = now
        try:
            text = storage.read_text(self.marker) if storage.exists(self.marker) else None
        except Exception:
            return False
        if text is None:
            return False
        try:
            self._driver_signal = json.loads(text).get("signal", "a signal")
        except ValueError:
            self._driver_signal = "a signal"
        return True

    def poll(self, done: int, stop: int) -> StopRequest | None:
        """After step `done` (of a run ending at `stop`): a request, the same on every rank."""
        import torch

        if done >= stop:
            return None  # the last step checkpoints and ends the run anyway
        flags = torch.tensor([
            1.0 if self.strategy.is_rank0 and self._driver_requested() else 0.0,
            1.0 if _worker_signal is not None else 0.0,
            1.0 if not self._drain_saved and node_drain_notice() else 0.0,
        ], dtype=torch.float64)
        driver, worker, drain = (v > 0 for v in self.strategy.all_reduce_sum(flags).tolist())
        if driver:
            return StopRequest("driver", f"{self._driver_signal or 'a signal'} to the driver")
        if worker:
            return StopRequest("worker", signal_name(_worker_signal) if _worker_signal else "SIGTERM")
        if drain:
            self._drain_saved = True
            return StopRequest("drain", "its node is being drained")
        return None
