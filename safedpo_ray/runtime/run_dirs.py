"""A command's run directory: checked writable before any work, and not left half-written when
the command stops at a user error.

    claim(run_dir, "run.output_dir")   # UserError when it cannot be created; remembered
    discard_unstarted()                # the CLI, after a UserError: remove what this command created

A run directory this command created is removed again after a user error (exit 2) as long as Ray
never started for it (no `logs/` inside: the error message would point there). Parent
directories this command created are removed when they are left empty. A directory that
existed before the command is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safedpo_ray.errors import UserError

_claimed: list[tuple[Path, Path]] = []  # (run directory, the top-most directory it adds)


def _nearest_existing(path: Path) -> tuple[Path, Path | None]:
    """(the nearest ancestor that exists, the top-most one that does not, or None)."""
    top = None
    while not os.path.lexists(path):
        top, path = path, path.parent
    return path, top


def claim(run_dir: Path, key: str = "run.output_dir") -> None:
    """Check that `run_dir` can be created and written (one sentence naming `key` if not), and
    remember it if this command will create it."""
    run_dir = Path(os.path.abspath(run_dir))
    existing, top = _nearest_existing(run_dir)
    if not existing.is_dir():
        raise UserError(f"{key}: cannot create the run directory {run_dir}: {existing} is not a directory; "
                        f"choose another {key}")
    try:  # the real test: permissions, a read-only filesystem, a full disk (root ignores mode bits)
        fd, probe = tempfile.mkstemp(prefix=".safedpo-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{key}: cannot write the run directory {run_dir} ({existing}: "
                        f"{exc.strerror or exc}); choose a writable {key}") from None
    if top is not None and all(r != run_dir for r, _ in _claimed):
        _claimed.append((run_dir, top))


def discard_unstarted() -> list[Path]:
    """Remove the run directories this command created and that hold no Ray logs (nothing ran);
    then the parents it created, if empty. Returns what was removed."""
    removed = []
    while _claimed:
        run_dir, top = _claimed.pop()
        if (run_dir / "logs").exists() or not run_dir.is_dir():
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir)
        parent = run_dir.parent
        while top != run_dir and (parent == top or top in parent.parents):
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent
    return removed


def forget() -> None:
    """A command that succeeded keeps its directories (and tests start clean)."""
    _claimed.clear()
