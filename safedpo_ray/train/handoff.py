"""Pairs handed to training workers that started before preparation ended.

`safedpo-ray train` on rows not prepared yet starts Ray Train's workers and prepares the pairs
at the same time (train/early_start.py decides): the workers load the model while Ray Data
reads and tokenizes, then wait here for the prepared files. The driver announces them in the
run root (a local path, a shared filesystem or an object store: where every rank can read):
    <run root>/PAIRS_READY.json   {"pairs": {"train": ..., "eval": ...}, "has_eval": true}
                                  or {"error": "..."} when preparation failed

The driver's stop marker (train/preempt.py) ends the wait too: a signal before the pairs are
ready stops the workers with nothing to save. All ranks agree before going on (one all-reduce),
so no rank enters DeepSpeed's collectives while another gives up.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from safedpo_ray.runtime import storage
from safedpo_ray.train.preempt import STOP_MARKER, clear_marker

READY = "PAIRS_READY.json"
LOCAL_POLL_S = 0.1
REMOTE_POLL_S = 2.0  # an object store is asked at most this often


class NoPairs(Exception):
    """The pairs will not come: preparation failed, or the driver was signalled meanwhile."""


def withdraw(root: str) -> None:
    """Before the workers start: no announcement of an earlier attempt of this run is left."""
    clear_marker(_path(root))


def announce(root: str, *, pairs: dict[str, str] | None = None, has_eval: bool = False,
             error: str | None = None) -> None:
    """The driver's side: the prepared split files (what `Prepared.pair_files()["pairs"]` gives),
    or the error that ended preparation."""

    payload = {"error": error} if error is not None else {"pairs": pairs, "has_eval": has_eval}
    storage.write_text(_path(root), json.dumps(payload))


def wait_for_pairs(root: str, agree: Callable[[bool], bool] | None = None, *,
                   poll_s: float | None = None) -> dict[str, Any]:
    """The workers' side: {"pairs": ..., "has_eval": ...} once announced. Raises NoPairs on an
    announced error or the driver's stop marker. `agree(gave_up)` -> any rank gave up (an
    all-reduce across ranks); every rank calls it once, after its own wait."""

    ready, stop = _path(root), storage.join(root, STOP_MARKER)
    poll = poll_s if poll_s is not None else (REMOTE_POLL_S if storage.is_remote(root) else LOCAL_POLL_S)
    payload: dict[str, Any] | None = None
    while True:
        if storage.exists(ready):
            try:
                payload = json.loads(storage.read_text(ready))
                break
            except ValueError:  # caught half-written: read it again
                pass
        if storage.exists(stop):
            payload = {"error": "the driver was signalled before the pairs were ready: stopped, nothing to save"}
            break
        time.sleep(poll)
    gave_up = "error" in payload
    if agree is not None and agree(gave_up) and not gave_up:
        payload = {"error": "another worker stopped waiting for the pairs"}
    if "error" in payload:
        raise NoPairs(payload["error"])
    return payload


def _path(root: str) -> str:
    return storage.join(root, READY)
