"""The console a person reads: our own lines on stdout; Ray's and the libraries' logs in a file.

By default the commands that run on Ray (train, prepare, sft, evaluate, train-scorer, tune,
verify, delta-study) print only what this project says: the data statistics, one progress line
per logged step, checkpoints, the summary. Everything else goes to a log file: Ray's driver logs,
Ray Data's execution dumps, what every worker and actor prints (forwarded by Ray's log monitor),
Python warnings, the libraries' loggers. The file is `<run_dir>/logs/console.log` for a run (a
command without a run directory uses Ray's session log directory); its path is printed once.
`--verbose` prints everything on the console as before (the file is written too).

How it works (checked against Ray 2.60):
- Workers' output reaches the driver through Ray's log monitor (`ray.init(log_to_driver=True)`),
  which hands each batch of lines to the handlers of
  `ray._private.ray_logging.global_worker_stdstream_dispatcher`; Ray's own handler
  (`ray_print_logs`) prints them. We put ours in its place: a line that starts with one of our tags
  ([safedpo], [sft]) is printed, every line is written to the file, and the raylet's and the
  autoscaler's own rare messages (a worker killed for memory, resources that cannot be scheduled)
  still go through Ray's printer. This is the same on a cluster and in a Ray Job (whose log is the
  driver's stdout): rank 0's progress lines reach the driver wherever rank 0 runs. Reading rank
  0's metrics.jsonl on the driver would not: on a cluster it may be on another node, or staged
  for an object store.
- The driver's Python logging: the console handlers of Ray's and the libraries' loggers are
  replaced by the file, the root logger writes to the file (no `lastResort` on stderr), and
  `warnings` are captured into logging.
- Progress bars of Ray Data, transformers and datasets are turned off (they would only fill the
  file). Progress bars a command shows on purpose (evaluate's `output.progress`) stay.
Every line written to the file goes through `secret_guard.redact` first.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from safedpo_ray.runtime import ray_env
from safedpo_ray.runtime.secret_guard import redact
from safedpo_ray.runtime.storage import local_run_dir

TAGS = ("[safedpo]", "[sft]")
LOG_DIR, LOG_FILE = "logs", "console.log"
# Loggers that print on their own (propagate=False, a console handler of their own).
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "datasets", "huggingface_hub",
                   "DeepSpeed", "deepspeed", "torch", "peft", "accelerate", "filelock", "urllib3")
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours Ray puts in its messages
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

_session: "Session | None" = None


class _FileHandler(logging.Handler):
    def __init__(self, session: "Session"):
        super().__init__(logging.INFO)
        self.session = session
        self.setFormatter(_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return _FORMAT.format(record)  # ours, whatever setFormatter is called with (ray.init calls it)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.session.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class Session:
    """One command's console: created by `start`, ended by `finish` (which undoes everything)."""
    def __init__(self, command: str, verbose: bool):
        self.command, self.verbose = command, verbose
        self.lock = threading.RLock()
        self.pending: list[str] = []
        self.file = None
        self.path: Path | None = None
        self.handler = _FileHandler(self)
        self.undo: list[Callable[[], None]] = []
        self.ray_print: Callable | None = None
        ray = sys.modules.get("ray")
        # a Ray up before this command (a caller's, e.g. a notebook or a test session) is not ours to stop
        self.ray_was_up = bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())

    # -- the file ------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        text = _ANSI.sub("", redact(text))
        with self.lock:
            if self.file is not None:
                self.file.write(text)
                self.file.flush()
            else:
                self.pending.append(text)

    def attach(self, path: Path) -> None:
        with self.lock:
            if self.file is not None:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a", encoding="utf-8")
            self.path = path
            self.file.write(f"==== safedpo-ray {self.command} {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                            "Ray's and the libraries' logs (--verbose prints them on the console) ====\n")
            self.file.write("".join(self.pending))
            self.file.flush()
            self.pending = []

    # -- driver-side logging -------------------------------------------------------------------
    def route_loggers(self) -> None:
        """Swap console handlers of library loggers for the file (again after late imports)."""
        for name in LIBRARY_LOGGERS:
            lg = logging.getLogger(name)
            if self.handler in lg.handlers:
                continue
            console = [h for h in lg.handlers if _is_console(h)]
            if not console and lg.propagate:
                continue  # reaches an ancestor we route (or the root)
            if not self.verbose:
                for h in console:
                    lg.removeHandler(h)
                    self.undo.append(lambda lg=lg, h=h: lg.addHandler(h))
                if lg.propagate:
                    continue  # the root logger writes its records to the file (quiet mode)
            lg.addHandler(self.handler)
            self.undo.append(lambda lg=lg: lg.removeHandler(self.handler))

    def quiet(self) -> None:
        if self.verbose:
            return
        for k, v in QUIET_ENV.items():
            if k not in os.environ:
                os.environ[k] = v
                self.undo.append(lambda k=k: os.environ.pop(k, None))
        root = logging.getLogger()
        root.addHandler(self.handler)
        self.undo.append(lambda: root.removeHandler(self.handler))
        logging.captureWarnings(True)
        self.undo.append(lambda: logging.captureWarnings(False))
        if "transformers" in sys.modules:
            try:  # transformers configures its logger (a stderr handler) on first use: do it now, then swap it
                from transformers.utils import logging as hf_logging

                hf_logging.get_logger("transformers")
                if hf_logging.is_progress_bar_enabled():
                    hf_logging.disable_progress_bar()
                    self.undo.append(hf_logging.enable_progress_bar)
            except Exception:  # pragma: no cover - transformers absent or changed
                pass
        else:
            self.catch_console_handlers("transformers")
        if "ray.data" not in sys.modules:  # Ray Data sets its stderr handler when first imported
            self.catch_console_handlers("ray.data")
        self.route_loggers()

    def catch_console_handlers(self, name: str) -> None:
        """A library not imported yet (transformers: seconds, torch included) will give its logger
        a stderr handler when it is: the file gets its records instead, as `route_loggers` would
        arrange, without importing it now. (Its progress bars follow QUIET_ENV, read on import.)"""
        lg = logging.getLogger(name)
        session = self

        def add_handler(handler: logging.Handler) -> None:
            if _is_console(handler):
                session.undo.append(lambda h=handler: logging.Logger.addHandler(lg, h))  # as route_loggers undoes
                if session.handler in lg.handlers:
                    return
                session.undo.append(lambda: lg.removeHandler(session.handler))
                handler = session.handler
            logging.Logger.addHandler(lg, handler)

        lg.addHandler = add_handler  # this logger only, until `finish`
        self.undo.append(lambda: vars(lg).pop("addHandler", None))

    # -- Ray -----------------------------------------------------------------------------------
    def ray_ready(self, run: Any = None, started: bool = False) -> None:
        self.route_loggers()
        if self.file is None:
            self.attach(self.log_path(run))
            if not self.verbose:
                print(f"[safedpo] Ray's and the libraries' logs: {self.path} (--verbose prints them here)", flush=True)
        if self.ray_print is None:
            self._take_worker_output()
        if not self.verbose:
            try:
                import ray.data

                ctx = ray.data.DataContext.get_current()
                if ctx.enable_progress_bars:
                    ctx.enable_progress_bars = False
                    self.undo.append(lambda: setattr(ctx, "enable_progress_bars", True))
            except Exception:  # pragma: no cover
                pass

    def log_path(self, run: Any) -> Path:
        """<run_dir>/logs/console.log when the run directory exists (a run checks and creates it
        before starting Ray), else a file in Ray's session log directory."""
        name = getattr(run, "name", None)
        if name:
            try:
                run_dir = local_run_dir(run, name)
                if run_dir.is_dir():
                    return run_dir / LOG_DIR / LOG_FILE
            except Exception:
                pass
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = None
        try:
            import ray

            node = ray._private.worker._global_node
            base = Path(node.get_logs_dir_path()) if node is not None else None
        except Exception:
            base = None
        base = base or Path(tempfile.gettempdir()) / "safedpo-ray" / LOG_DIR
        return base / f"safedpo-ray-{self.command}-{stamp}-{os.getpid()}.log"

    def _take_worker_output(self) -> None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # pragma: no cover - a Ray without it: its printer stays
            self.write("safedpo console: Ray's log dispatcher not found; worker output stays on the console\n")
            return
        with dispatcher._lock:
            ours = [h for n, h in dispatcher.handlers if n == "ray_print_logs"]
        self.ray_print = ours[0] if ours else (lambda data: None)
        if not ours:  # log_to_driver=False, or a client connection: nothing to take over
            return
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("safedpo_console", self.on_worker_output)

        def restore() -> None:
            dispatcher.remove_handler("safedpo_console")
            dispatcher.add_handler("ray_print_logs", ours[0])

        self.undo.append(restore)

    def on_worker_output(self, data: dict[str, Any]) -> None:
        """One batch of lines from a worker, actor or task (Ray's log monitor thread)."""
        try:
            pid = data.get("pid")
            if self.verbose or pid in ("autoscaler", "raylet"):
                self.ray_print(data)
            who = data.get("actor_name") or data.get("task_name") or ""
            ip = data.get("ip")
            where = "" if ip == data.get("localhost") else f", ip={ip}"
            prefix = f"({who + ' ' if who else ''}pid={pid}{where})"
            lines = data.get("lines", ())
            if pid == "autoscaler":  # the monitor's whole log comes along; Ray prints its events only
                try:
                    from ray._private.worker import filter_autoscaler_events

                    lines = list(filter_autoscaler_events(lines))
                except Exception:  # no Ray to ask which autoscaler this is: keep no dump
                    lines = []
            for line in lines:
                if "__ray_tqdm_magic_token__" in line:
                    continue
                self.write(f"{prefix} {line}\n")
                if not self.verbose and line.lstrip().startswith(TAGS):
                    with self.lock:
                        print(redact(line), file=sys.stdout, flush=True)
        except Exception as exc:  # pragma: no cover - never break Ray's log thread
            self.write(f"safedpo console: {type(exc).__name__}: {exc}\n")

    # -- the end -------------------------------------------------------------------------------
    def finish(self, failed: bool = False) -> None:
        if ray_env.started_here() and not self.ray_was_up:  # the command that started Ray stops it, while its output still comes here
            try:
                ray_env.shutdown()
            except Exception:  # pragma: no cover
                pass
        for undo in reversed(self.undo):
            try:
                undo()
            except Exception:  # pragma: no cover
                pass
        self.undo = []
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None
            elif self.pending and not self.verbose:
                # Ray never started (an early error): what the libraries said goes to stderr.
                sys.stderr.write("".join(self.pending))
                self.pending = []
        if failed and self.path is not None:
            print(f"safedpo-ray: Ray's and the libraries' logs: {self.path}", file=sys.stderr)


def start(command: str, verbose: bool = False) -> Session:
    """Begin the console of a command that runs on Ray (cli/verbs.py says which do); returns the session."""
    global _session
    finish()
    _session = Session(command, verbose)
    name = ray_env.driver_accelerator_env()  # a cause of a warning, fixed (not hidden) in both modes
    if name:
        _session.undo.append(lambda: os.environ.pop(name, None))
    import ray  # noqa: F401  (Ray configures its loggers, with a stderr handler, on import: route them now)

    _session.quiet()
    if verbose:
        _session.route_loggers()
    return _session


def ray_ready(run: Any = None, started: bool = False) -> None:
    """Called by `ray_env.ensure_ray` once Ray is up (`started`: this call started it)."""
    if _session is not None:
        _session.ray_ready(run, started)


ray_env.on_ready(ray_ready)


def current() -> Session | None:
    return _session


def finish(failed: bool = False) -> None:
    global _session
    session, _session = _session, None
    if session is not None:
        session.finish(failed)
