"""Cluster jobs through the Ray Jobs API: `safedpo-ray submit` and `safedpo-ray jobs ...`.

    safedpo-ray submit --address http://127.0.0.1:8265 -- train --config my.yaml run.storage_path=s3://b/runs
    safedpo-ray submit --wait -- evaluate --config eval.yaml --model s3://b/runs/r1/model     # RAY_ADDRESS set
    safedpo-ray jobs list | status ID | logs ID [--follow] | stop ID

The address is the Ray dashboard's (job server), `--address` or `RAY_ADDRESS`; it is not exposed
beyond the cluster by default: open a tunnel first (cluster/README.md). `submit` checks the job's
command line and configuration here, before anything is shipped: the verb's own argument parser,
the `--config` file (it must exist and lie inside the shipped working directory, whose path it is
rewritten to) and the configuration loader (unknown keys, wrong types, inconsistent values). The
working directory (default: the current one) travels as the job's `runtime_env` working_dir,
without .git, virtual environments, runs/ and caches; the cluster runs `safedpo-ray VERB ARGS...`
in it with its own installed package.

Exit codes: 0 done (or submitted); 1 the job failed or was stopped (`--wait`, `logs --follow`,
`status`); 2 a usage or configuration error, nothing shipped; 3 the cluster cannot be reached;
4 no such job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from safedpo_ray.cli.verbs import BY_NAME, SUBMIT_VERBS, Verb, parser_for
from safedpo_ray.config.training import ConfigError
from safedpo_ray.errors import UserError
from safedpo_ray.runtime.secret_guard import assert_not_in, check_job_env
from safedpo_ray.runtime.storage import WHAT_TO_SET

# Never shipped with a job: version control, environments, outputs and caches.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "env", "runs", "eval", "scorers", "**/__pycache__", "*.egg-info",
                    ".pytest_cache", ".mypy_cache", ".cache", "*.safetensors", "*.bin", "*.gguf", "*.pt",
                    # files that usually hold secrets: a job's files are readable on the whole cluster
                    ".env", ".env.*", ".envrc", ".netrc", ".git-credentials", "*.pem", ".aws", ".ssh"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120  # how long submit retries while a just-started cluster has no job agent yet
TUNNEL_HINT = ("the dashboard/job server is not exposed outside the cluster by default; open a tunnel first: "
               "`ray dashboard cluster/cluster.yaml` (Ray cluster launcher, then use http://127.0.0.1:8265) or "
               "`kubectl port-forward svc/safedpo-head-svc 8265:8265` (KubeRay)")


class JobsError(UserError):
    """A job command that cannot be done; `exit_code` is what the CLI returns."""
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- the cluster


def cluster_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                        f"({TUNNEL_HINT})")
    if "://" not in address and address != "auto":
        address = "http://" + address  # a bare host:port means the dashboard, not the GCS
    return address


@contextlib.contextmanager
def _address_wins():
    """Ray's clients take RAY_API_SERVER_ADDRESS / RAY_ADDRESS from the environment over the
    address they are given (a local Ray started in this process sets the first): hide both."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None):
    """A JobSubmissionClient for the address, or JobsError(exit 3) saying how to reach one."""
    from ray.job_submission import JobSubmissionClient

    url = cluster_address(address)
    try:
        with _address_wins():
            return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, or a version/HTTP error from the server
        raise JobsError(f"cannot reach the Ray job server at {url}: {exc}\nIs the cluster up? {TUNNEL_HINT}",
                        exit_code=3) from None


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise JobsError(f"no job '{job_id}' on this cluster (`safedpo-ray jobs list` shows them)",
                            exit_code=4) from None
        raise


def alive_node_count(address: str) -> int | None:
    """Alive nodes of the cluster behind a dashboard address (None when it cannot be asked)."""
    try:
        from ray.util.state import list_nodes

        with _address_wins():
            nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return len(nodes)
    except Exception:
        return None


# --------------------------------------------------------------------------- checking a job


# Arguments naming a local file that must travel with the job: (flag, required to exist).
# `tune --space` may also name a shipped space (quick, paper-grid...), left as is.
FILE_FLAGS = {"--config": True, "--space": False}


def _file_args(argv: list[str]) -> list[tuple[str, int, str]]:
    """(flag, index, value) of each file argument in argv ('--flag X' or '--flag=X')."""
    found = []
    for i, tok in enumerate(argv):
        for flag in FILE_FLAGS:
            if tok == flag and i + 1 < len(argv):
                found.append((flag, i + 1, argv[i + 1]))
            elif tok.startswith(flag + "="):
                found.append((flag, i, tok.split("=", 1)[1]))
    return found


def build_job(command: list[str], *, working_dir: Path, excludes: list[str] | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Check a job's command line here and make what is submitted: {"entrypoint", "runtime_env",
    "verb", "config"}. Raises JobsError (usage), ConfigError (configuration)."""

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise JobsError(f"nothing to submit: safedpo-ray submit [options] -- VERB ARGS... "
                        f"(VERB: {', '.join(SUBMIT_VERBS)})")
    verb, args = command[0], list(command[1:])
    if verb not in SUBMIT_VERBS:
        raise JobsError(f"cannot submit '{verb}': submit runs one of {', '.join(SUBMIT_VERBS)}")
    working_dir = working_dir.resolve()
    if not working_dir.is_dir():
        raise JobsError(f"--working-dir {working_dir} is not a directory")
    try:
        ns = parser_for(verb).parse_args(args)
    except SystemExit as exc:  # argparse printed the problem
        raise JobsError(f"the job's command line `safedpo-ray {shlex.join(command)}` is invalid "
                        "(see above); nothing was submitted") from exc
    config = None
    for flag, index, raw in _file_args(args):
        path = Path(raw).expanduser()
        if not path.is_file():
            if FILE_FLAGS[flag]:
                raise ConfigError(f"{flag} {raw}: no such file")
            continue  # e.g. the name of a shipped search space
        if flag == "--config":
            config = path
        try:
            rel = path.resolve().relative_to(working_dir)
        except ValueError:
            raise JobsError(f"{flag} {raw} is outside the directory shipped with the job ({working_dir}): "
                            "run submit from a directory that contains it, or pass --working-dir") from None
        shipped = rel.as_posix()  # the job runs in the shipped copy of working_dir
        args[index] = shipped if args[index] == raw else f"{flag}={shipped}"
    if config is not None:
        ns.config = config  # loaded as the job will load its shipped copy
    loaded = BY_NAME[verb].load(ns)  # ConfigError names the key; nothing is shipped

    check_job_env(env or {}, _secret_env_names(verb, loaded))  # secrets stay in the cluster's own env
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir),
                                   "excludes": DEFAULT_EXCLUDES + list(excludes or [])}
    if env:
        runtime_env["env_vars"] = dict(env)
    entrypoint = shlex.join(["safedpo-ray", verb, *args])
    assert_not_in({"entrypoint": entrypoint, "runtime_env": runtime_env}, "the job's command line or runtime_env")
    return {"entrypoint": entrypoint, "runtime_env": runtime_env,
            "verb": verb, "config": config, "namespace": ns, "loaded": loaded}


def _secret_env_names(verb: str, loaded: Any) -> list[str]:
    """Variables the job's configuration reads a secret from (evaluate: judge.api_key_env)."""
    if verb != "evaluate":
        return []
    return [loaded.judge.api_key_env or ""]


def _env_vars(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise JobsError(f"--env {name}: not set here (give --env {name}=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env


def _storage_unset_on_cluster(job: dict[str, Any], address: str) -> None:
    """A job whose rank 0 writes its outputs (train, sft, tune, verify, delta-study: the table's
    rank0_writes_to_storage) needs run.storage_path on a cluster of several nodes (the job would
    refuse to start): say so before shipping. Unknown node counts and other verbs pass
    (train-scorer checks its scorer.output_dir itself, which may be a URI or a shared mount)."""
    if not BY_NAME[job["verb"]].rank0_writes_to_storage or job["loaded"].run.storage_path:
        return
    nodes = alive_node_count(address)
    if nodes and nodes > 1:
        raise JobsError(f"this cluster has {nodes} nodes and run.storage_path is unset: the {job['verb']} job's "
                        f"outputs would stay on whichever node holds rank 0. {WHAT_TO_SET}; nothing was submitted")


# --------------------------------------------------------------------------- verbs


def cmd_submit(args: argparse.Namespace) -> int:
    job = build_job(args.job, working_dir=Path(args.working_dir or os.getcwd()), excludes=args.exclude,
                    env=_env_vars(args.env))
    client = connect(args.address)
    url = cluster_address(args.address)
    _storage_unset_on_cluster(job, url)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                                       submission_id=args.name, metadata={"safedpo_verb": job["verb"]})
            break
        except Exception as exc:
            # A cluster that just started: its job agent registers a few seconds after the dashboard.
            if "No available agent" in str(exc) and time.time() < deadline:
                time.sleep(2)
                continue
            raise JobsError(f"the cluster refused the job: {exc}", exit_code=1) from None
    addr = f" --address {url}" if args.address else ""
    print(f"submitted job {job_id}: {job['entrypoint']}")
    print(f"  follow:  safedpo-ray jobs logs {job_id} --follow{addr}")
    print(f"  status:  safedpo-ray jobs status {job_id}{addr}")
    print(f"  stop:    safedpo-ray jobs stop {job_id}{addr}", flush=True)
    if not args.wait:
        return 0
    return follow(client, job_id)


def follow(client, job_id: str, out=None) -> int:
    """Stream a job's logs until it ends; 0 when it succeeded, 1 otherwise."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (safedpo-ray jobs stop {job_id} ends it)", file=sys.stderr)
        return 130
    except Exception as exc:  # the stream broke (cluster gone): report what the status says
        print(f"safedpo-ray: lost the log stream of {job_id}: {exc}", file=sys.stderr)
    info = _job_info(client, job_id)
    for _ in range(60):  # the stream can end a moment before the status settles
        if str(info.status) in TERMINAL:
            break
        time.sleep(0.5)
        info = _job_info(client, job_id)
    return _report_status(job_id, info)


def _report_status(job_id: str, info) -> int:
    status = str(info.status)
    line = f"job {job_id}: {status}"
    if info.message:
        line += f": {info.message}"
    print(line, file=sys.stderr if status in ("FAILED", "STOPPED") else sys.stdout, flush=True)
    return 1 if status in ("FAILED", "STOPPED") else 0


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_list(args: argparse.Namespace) -> int:
    client = connect(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'job id':<28} {'status':<10} {'started':<20} entrypoint")
    for j in jobs:
        entry = j.entrypoint if len(j.entrypoint) <= 90 else j.entrypoint[:87] + "..."
        print(f"{j.submission_id or j.job_id:<28} {str(j.status):<10} {_when(j.start_time):<20} {entry}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    info = _job_info(client, args.job_id)
    print(f"job:        {args.job_id}\nstatus:     {info.status}\nentrypoint: {info.entrypoint}\n"
          f"started:    {_when(info.start_time)}\nended:      {_when(info.end_time)}")
    if info.message:
        print(f"message:    {info.message}")
    return 1 if str(info.status) in ("FAILED", "STOPPED") else 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    _job_info(client, args.job_id)  # a clear message for an unknown id
    if args.follow:
        return follow(client, args.job_id)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    info = _job_info(client, args.job_id)
    if str(info.status) in TERMINAL:
        print(f"job {args.job_id} already ended: {info.status}")
        return 0
    client.stop_job(args.job_id)
    print(f"stop requested for job {args.job_id} (was {info.status})")
    return 0


ADDRESS_HELP = "Ray dashboard / job server, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"


def submit_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "safedpo-ray submit [--address URL] [--wait] [options] -- VERB ARGS..."
    p.description = ("Check the command here, ship the working directory (with a --config file) as the job's "
                     f"runtime_env, and run `safedpo-ray VERB ARGS...` on the cluster. VERB: {', '.join(SUBMIT_VERBS)}.")
    address_help = ADDRESS_HELP
    p.add_argument("--address", help=address_help)
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 1 if it failed")
    p.add_argument("--working-dir", dest="working_dir", help="directory shipped with the job (default: current)")
    p.add_argument("--exclude", action="append", help="also leave out this path pattern (repeatable)")
    p.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                   help="environment variable for the job (value from here when not given; repeatable); "
                        "secrets are refused: give them to the cluster's nodes")
    p.add_argument("--name", help="job id to use (default: generated)")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="-- VERB ARGS...",
                   help="the safedpo-ray command the cluster runs")


def jobs_arguments(j: argparse.ArgumentParser) -> None:
    address_help = ADDRESS_HELP
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    for name, fn, help_ in (("list", cmd_list, "jobs on the cluster"),
                            ("status", cmd_status, "a job's status (exit 1 if it failed or was stopped)"),
                            ("logs", cmd_logs, "a job's logs (--follow: until it ends)"),
                            ("stop", cmd_stop, "stop a running job")):
        q = jsub.add_parser(name, help=help_)
        q.add_argument("--address", help=address_help)
        if name != "list":
            q.add_argument("job_id", metavar="ID")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        q.set_defaults(jobs_fn=fn)


def cmd_jobs(args: argparse.Namespace) -> int:
    return args.jobs_fn(args)


JOB_VERBS = (
    Verb("submit", "run any of the verbs above as a job on a Ray cluster (Ray Jobs API)", cmd_submit, None,
         submit_arguments, on_ray=False, submittable=False),
    Verb("jobs", "list, inspect, follow or stop cluster jobs", cmd_jobs, None, jobs_arguments,
         on_ray=False, submittable=False),
)
