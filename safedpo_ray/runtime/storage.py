"""Run storage: one root for every output of a run, a local/shared path or an object-store URI.

    run.storage_path unset          → <output_dir>/<name>            (one machine; Ray Train under ./ray)
    run.storage_path=/mnt/shared/x  → /mnt/shared/x/<name>           (a filesystem every node mounts)
    run.storage_path=s3://b/prefix  → s3://b/prefix/<name>           (also gs://, abfs://, hdfs://)

Filesystems come from `pyarrow.fs` (what Ray Train uses for checkpoints too): credentials are
the usual ones of each store (AWS_* variables or an instance role, GOOGLE_APPLICATION_CREDENTIALS...),
and options ride in the URI's query, e.g. `s3://b/p?endpoint_override=http://minio:9000&region=us-east-1`.

Who writes what: the driver writes config.yaml, data_stats.json, quarantine.jsonl and the built
tiny model (init-model/); rank 0, wherever it runs, writes metrics.jsonl, pairs.jsonl,
tensorboard/, the exported model/ and train_result.json; Ray Train writes checkpoint_*; the
driver reads train_result.json back and writes summary.json. With a local root everyone writes
in place; with an object store, rank 0 writes into a node-local staging directory and uploads
(`RunOutputs`), and consumers of a model URI download it once per node (`localize`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from safedpo_ray.errors import UserError

# URI schemes pyarrow.fs resolves (`FileSystem.from_uri`); others are refused at config load.
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
MARKS = "log_marks.json"  # rank 0's log sizes at each checkpoint (exact truncation on restore)
LOGS = ("metrics.jsonl", "pairs.jsonl")


class StorageError(UserError):
    """Run storage that cannot work as configured (e.g. node-local on a multi-node cluster)."""


# --------------------------------------------------------------------------- paths and URIs


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def scheme_of(path: str | os.PathLike) -> str:
    return urlsplit(str(path)).scheme.lower() if is_uri(path) else ""


def resolve(path: str | os.PathLike):
    """(pyarrow filesystem, path on it) for a local path or a URI."""
    import pyarrow.fs as pafs

    text = str(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(text)
    except Exception as exc:  # unknown scheme, bad options, missing credentials
        raise StorageError(f"cannot open storage '{redact(text)}': {exc}") from exc


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object store or HDFS (any URI but file://); decided by the scheme alone, since
    opening an s3:// filesystem may cost a network round trip."""
    return is_uri(path) and scheme_of(path) not in ("file", "local")


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (a URI's query stays at the end)."""
    text = str(base)
    if not is_uri(text):
        return str(Path(text, *parts))
    s = urlsplit(text)
    path = "/".join([s.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def basename(path: str | os.PathLike) -> str:
    """The last part of a local path or a URI's path (its query left out)."""
    text = str(path)
    return (urlsplit(text).path if is_uri(text) else text).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str | os.PathLike) -> str:
    """The parent of a local path or a URI (a URI's query stays at the end)."""
    text = str(path)
    if not is_uri(text):
        return str(Path(text).parent)
    s = urlsplit(text)
    return urlunsplit((s.scheme, s.netloc, s.path.rstrip("/").rsplit("/", 1)[0], s.query, s.fragment))


def redact(uri: str) -> str:
    """A URI with secret query values hidden (for messages and logs)."""
    if not is_uri(uri):
        return uri
    s = urlsplit(uri)
    if not s.query:
        return uri
    query = "&".join(
        f"{k}=***" if any(w in k.lower() for w in ("secret", "token", "key", "password")) else f"{k}={v}"
        for k, _, v in (item.partition("=") for item in s.query.split("&"))
    )
    return urlunsplit((s.scheme, s.netloc, s.path, query, s.fragment))


# --------------------------------------------------------------------------- reading and writing


def exists(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(path: str | os.PathLike) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str | os.PathLike, text: str) -> None:
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    return json.loads(read_text(path)) if exists(path) else default


def upload(local: str | os.PathLike, dest: str) -> None:
    """Copy a local file or directory (recursively) to `dest`, a path or URI."""
    import pyarrow.fs as pafs

    local = Path(local)
    fs, p = resolve(dest)
    if local.is_dir():
        fs.create_dir(p, recursive=True)
        pafs.copy_files(str(local.resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    elif local.exists():
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local.resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def download(src: str, local: str | os.PathLike) -> Path:
    """Copy a file or directory at `src` (path or URI) to the local path `local`."""
    import pyarrow.fs as pafs

    fs, p = resolve(src)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"nothing at '{redact(src)}'")
    local = Path(local)
    if info.type == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(p, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def scratch_dir(final: Path) -> Path:
    """A fresh sibling of `final` to write into before renaming it into place, named for this host
    and process; siblings that processes of this host left behind when they died (SIGKILL, a
    driver that stopped at once on a signal) are removed first. Not created."""
    import socket

    host = socket.gethostname().replace("/", "_")
    for stale in final.parent.glob(f"{final.name}.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{host}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def localize_light(path: str | os.PathLike) -> str:
    """`localize` of a model directory's files other than weights (tokenizer, configs; no
    subdirectory): what a driver needs to tokenize, without fetching a 7B model's ~13 GB to it.
    Anything else (a local path, a hub id, a file) as `localize` gives it."""
    import pyarrow.fs as pafs

    text = str(path)
    if not is_uri(text):
        return text
    fs, p = resolve(text)
    if isinstance(fs, pafs.LocalFileSystem) or fs.get_file_info(p).type != pafs.FileType.Directory:
        return localize(text)
    light = sorted(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(p))
                   if i.type == pafs.FileType.File and not i.path.endswith(WEIGHT_SUFFIXES))
    return localize(text, parts=tuple(light))


def localize(path: str | os.PathLike, parts: tuple[str, ...] | None = None) -> str:
    """A path this process can open: local paths and hub ids pass through; an object-store URI
    is downloaded once per node into a cache keyed by the URI and its listing (sizes, times).
    `parts`: only these children of a directory (e.g. a run's model/, not its checkpoints)."""
    import pyarrow.fs as pafs

    text = str(path)
    if not is_uri(text):
        return text
    fs, p = resolve(text)
    if isinstance(fs, pafs.LocalFileSystem):
        return p
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"nothing at '{redact(text)}'")
    if parts is not None:
        listing = []
        for part in parts:
            sub = fs.get_file_info(f"{p}/{part}")
            listing += [sub] + (fs.get_file_info(pafs.FileSelector(sub.path, recursive=True))
                                if sub.type == pafs.FileType.Directory else [])
    elif info.type == pafs.FileType.File:
        listing = [info]
    else:
        listing = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    h = hashlib.sha256(f"{redact(text)}|{parts}".encode())
    for i in sorted(listing, key=lambda i: i.path):
        h.update(f"{i.path}:{i.size}:{i.mtime_ns}".encode())
    cache = Path(os.environ.get("SAFEDPO_STORAGE_CACHE", Path.home() / ".cache" / "safedpo-ray" / "storage"))
    name = Path(p).name or "root"
    target = cache / h.hexdigest()[:20] / name
    if (target.parent / ".complete").exists():
        return str(target)
    tmp = cache / f".tmp-{uuid.uuid4().hex}"
    if parts is None:
        download(text, tmp / name)
    else:
        (tmp / name).mkdir(parents=True)
        for part in parts:
            if exists(join(text, part)):
                download(join(text, part), tmp / name / part)
    (tmp / ".complete").write_text(redact(text))
    try:
        tmp.rename(target.parent)  # atomic: a half-downloaded copy is never used
    except OSError:  # another worker on this node finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@contextlib.contextmanager
def staged_output_dir(output):
    """An object-store `output.dir` (evaluation results): work in a local staging directory, with
    an earlier evaluation of the same name fetched first (to resume it), and upload it at the end,
    also when the evaluation fails part-way. Yields the results' URI (None for a local dir)."""
    uri = output.dir
    if not is_remote(uri):
        yield None
        return
    output.name = output.name or time.strftime("eval-%Y%m%d-%H%M%S")
    remote = join(uri, output.name)
    base = Path(tempfile.mkdtemp(prefix="safedpo-eval-", dir=os.environ.get("SAFEDPO_STAGING_DIR")))
    if exists(remote):
        download(remote, base / output.name)
    output.dir = str(base)
    try:
        yield remote
    finally:
        output.dir = uri
        if (base / output.name).exists():
            upload(base / output.name, remote)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- a run's layout


def run_root(run_cfg, name: str) -> str:
    """Where every output of run `name` lives (see the module docstring)."""
    if run_cfg.storage_path:
        base = run_cfg.storage_path if is_uri(run_cfg.storage_path) else str(Path(run_cfg.storage_path).resolve())
        return join(base, name)
    return str((Path(run_cfg.output_dir) / name).resolve())


def local_run_dir(run_cfg, name: str) -> Path:
    """The driver's directory for run `name`: the root itself when it is a local or shared path,
    else a staging directory under run.output_dir whose files are uploaded to the root."""
    root = run_root(run_cfg, name)
    return Path(resolve(root)[1]) if not is_remote(root) else (Path(run_cfg.output_dir) / name).resolve()


def publish_driver_files(root: str, run_dir: Path, model_path: str) -> str:
    """With an object-store root: upload what the driver wrote (config, data statistics,
    quarantine, a model it built) and return the model path workers should use (its URI when it
    was built inside the run directory). With a local root, nothing to do."""
    if not is_remote(root):
        return model_path
    for item in sorted(run_dir.iterdir()):
        if item.name not in ("ray",):
            upload(item, join(root, item.name))
    try:
        rel = Path(model_path).resolve().relative_to(run_dir.resolve())
    except (ValueError, OSError):
        return model_path
    return join(root, *rel.parts)


def publish_file(root: str, run_dir: Path, *parts: str) -> str:
    """A file the driver wrote at `run_dir/parts` as workers on any node address it: uploaded to
    an object-store root (its URI), else its path (the run directory is the root)."""
    local = run_dir.joinpath(*parts)
    if not is_remote(root):
        return str(local.resolve())
    uri = join(root, *parts)
    upload(local, uri)
    return uri


def save_json(root: str, run_dir: Path, name: str, data: Any) -> None:
    """Write `name` into the driver's run directory and, when the root is elsewhere, the root."""
    text = json.dumps(data, indent=2)
    (run_dir / name).write_text(text)
    if is_remote(root):
        write_text(join(root, name), text)


def collect_result(root: str, return_value: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's result as it reached the storage (train_result.json), with its model path as
    seen from the driver. Rank 0's return value stands in when the file is missing (a run that
    stopped before writing it)."""
    result = read_json(join(root, "train_result.json"))
    if result is None:
        result = dict(return_value or {})
    if is_remote(root) and "model_dir" in result:
        result["model_dir"] = join(root, "model")
    return result


class RunOutputs:
    """Rank 0's side of the run root: `local` is the directory it writes into (the root itself
    when local, else a node-local staging directory), uploaded at each checkpoint and at the end.

    The logs (metrics.jsonl, pairs.jsonl) follow the checkpoints: `mark(step)` records their sizes
    before checkpoint `step` is reported, and `restore(step)` cuts them back to those sizes when
    a run resumes from it, so a step trained again after a failure is logged once."""

    def __init__(self, root: str, name: str | None = None):
        self.root = root
        self.remote = is_remote(root)
        if self.remote:
            base = Path(os.environ.get("SAFEDPO_STAGING_DIR", tempfile.gettempdir()))
            self.local = base / "safedpo-staging" / uuid.uuid4().hex[:12] / (name or "run")
        else:
            self.local = Path(resolve(root)[1])

    def _pull(self, name: str) -> None:
        if self.remote and exists(join(self.root, name)):
            download(join(self.root, name), self.local / name)

    def push(self, *names: str) -> None:
        if not self.remote:
            return
        for name in names:
            if (self.local / name).exists():
                upload(self.local / name, join(self.root, name))

    def restore(self, step: int) -> None:
        """Before logging starts: fetch the logs and cut them back to checkpoint `step` (0: a
        fresh start, so nothing of an earlier attempt is kept)."""
        self.local.mkdir(parents=True, exist_ok=True)
        for name in (*LOGS, MARKS):
            self._pull(name)
        marks = self._marks()
        sizes = marks.get(str(step))
        for name in LOGS:
            path = self.local / name
            if not path.exists():
                continue
            if step == 0:
                path.write_text("")
            elif sizes is not None:
                with path.open("r+b") as f:
                    f.truncate(min(sizes.get(name, 0), path.stat().st_size))
            else:  # a checkpoint without marks (older runs): keep what was logged up to it
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= step]
                path.write_text("".join(line + "\n" for line in kept))
        marks = {k: v for k, v in marks.items() if int(k) <= step}
        (self.local / MARKS).write_text(json.dumps(marks))

    def _marks(self) -> dict[str, dict[str, int]]:
        path = self.local / MARKS
        return json.loads(path.read_text()) if path.exists() and path.read_text().strip() else {}

    def mark(self, step: int) -> None:
        """Record the logs' sizes for checkpoint `step` (call before reporting it) and upload."""
        self.local.mkdir(parents=True, exist_ok=True)
        marks = self._marks()
        marks[str(step)] = {n: (self.local / n).stat().st_size for n in LOGS if (self.local / n).exists()}
        (self.local / MARKS).write_text(json.dumps(marks))
        self.push(*LOGS, "tensorboard", MARKS)

    def append(self, name: str, record: dict[str, Any]) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        with (self.local / name).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        """Upload everything rank 0 wrote; drop the staging directory."""
        if not self.remote or not self.local.exists():
            return
        for item in sorted(self.local.iterdir()):
            upload(item, join(self.root, item.name))
        shutil.rmtree(self.local.parent, ignore_errors=True)


# --------------------------------------------------------------------------- multi-node check


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _sees_marker(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def _nodes_not_answering(fn: Callable[..., Any], args: tuple, expected: Any, nodes: list[dict[str, Any]],
                         timeout_s: float) -> list[str]:
    """Run `fn(*args)` as a zero-CPU task on each node at once; the node ids (with addresses)
    whose answer is not `expected` (or that gave none within `timeout_s`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {
        f"{n['NodeID']} ({n.get('NodeManagerAddress', '?')})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(*args)
        for n in nodes
    }
    missing = []
    for label, ref in refs.items():
        try:
            if ray.get(ref, timeout=timeout_s) != expected:
                missing.append(label)
        except Exception:
            missing.append(label)
    return missing


def probe_shared(path: str, nodes: list[dict[str, Any]], timeout_s: float = 60.0) -> list[str]:
    """Write a marker under local `path` and ask a zero-CPU task on each node whether it sees it;
    returns the node ids (with addresses) that do not."""
    Path(path).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = Path(path) / f".safedpo-shared-check-{token}"
    marker.write_text(token)
    try:
        return _nodes_not_answering(_sees_marker, (str(marker), token), True, nodes, timeout_s)
    finally:
        marker.unlink(missing_ok=True)


WHAT_TO_SET = ("set run.storage_path to a filesystem every node mounts (e.g. run.storage_path=/mnt/shared/safedpo) "
               "or to an object store (run.storage_path=s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)")


def check_cluster_storage(run_cfg, *, nodes: list[dict[str, Any]] | None = None,
                          probe: Callable[[str, list[dict[str, Any]]], list[str]] = probe_shared) -> None:
    """Refuse node-local run storage on a cluster of several nodes: rank 0 (which writes the
    outputs) may run on any node, and the driver must read them back. A local path given as
    run.storage_path is accepted when every node sees a marker file written there (a shared
    mount); unset storage is always node-local."""
    nodes = alive_nodes() if nodes is None else nodes
    if len(nodes) <= 1:
        return
    sp = run_cfg.storage_path
    if not sp:
        raise StorageError(
            f"this Ray cluster has {len(nodes)} nodes and run.storage_path is unset: the run's outputs "
            f"(checkpoints, metrics, summary.json, the model) would land on whichever node holds rank 0, "
            f"under run.output_dir={run_cfg.output_dir!r} of that node. {WHAT_TO_SET}")
    if is_remote(sp):
        return
    local = resolve(sp)[1]
    missing = probe(local, nodes)
    if missing:
        raise StorageError(
            f"run.storage_path={sp!r} is a node-local path on this {len(nodes)}-node cluster: "
            f"{len(missing)} node(s) do not see files written there ({', '.join(missing)}). {WHAT_TO_SET}")


def _listing(path: str) -> list[tuple[str, int]] | None:
    """(relative name, size) of every file under `path` (a file: itself); None when absent."""
    p = Path(path)
    if p.is_file():
        return [(p.name, p.stat().st_size)]
    if not p.is_dir():
        return None
    return sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*") if f.is_file())


def probe_same_files(path: str, nodes: list[dict[str, Any]], timeout_s: float = 60.0) -> list[str]:
    """Ask a zero-CPU task on each node for the files under local `path` (names and sizes);
    returns the node ids (with addresses) that do not see what this process sees."""
    return _nodes_not_answering(_listing, (path,), _listing(path), nodes, timeout_s)


def check_cluster_inputs(inputs: dict[str, str | None], *, nodes: list[dict[str, Any]] | None = None,
                         probe: Callable[[str, list[dict[str, Any]]], list[str]] = probe_same_files) -> None:
    """Refuse a local file or directory given as an input of remote work (a model the workers
    load, data Ray Data's tasks read; keyed by its config key) on a cluster of several nodes
    unless every node sees the same files there (a shared mount): that work may run on any node.
    URIs are read (models: fetched) on each node and hub ids downloaded there, so both pass."""
    local = {k: v for k, v in inputs.items() if v and not is_remote(v) and Path(v).exists()}
    if not local:
        return
    nodes = alive_nodes() if nodes is None else nodes
    if len(nodes) <= 1:
        return
    for key, value in local.items():
        missing = probe(str(Path(value).resolve()), nodes)
        if missing:
            raise StorageError(
                f"{key}={value!r} is on this machine's disk only: {len(missing)} of the {len(nodes)} nodes of this "
                f"cluster do not see the same files there ({', '.join(missing)}), and the work that reads it may "
                f"run on any of them. Copy it to an object store or a filesystem every node mounts and give that: "
                f"{key}=s3://BUCKET/PREFIX or {key}=/mnt/shared/...")


def current_node_id() -> str | None:
    """The Ray node this process runs on (the driver's, to compare with rank 0's)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
