"""A user error raised inside a Ray worker, found again on the driver.

    user = user_error_in(result.error)   # a UserError with the worker's sentence, or None

Ray Train wraps a worker's exception (a `WorkerGroupError` whose `worker_failures` map ranks to
errors, each maybe a `RayTaskError` whose `cause` is the original), and its text is the worker's
whole traceback. The CLI wants the one sentence the worker meant: the first UserError found in
that nest, rebuilt as a plain UserError of the same message (exit 2, no traceback).
"""

from __future__ import annotations

from safedpo_ray.errors import UserError


def _message(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def user_error_in(error: BaseException | None, _depth: int = 0) -> UserError | None:
    """The first UserError in `error`, its causes and its workers' failures (None: none)."""
    if error is None or _depth > 8:
        return None
    cause = getattr(error, "cause", None)  # RayTaskError: the original exception
    if isinstance(cause, BaseException) and cause is not error:
        found = user_error_in(cause, _depth + 1)
        if found is not None:
            return found
    if isinstance(error, UserError):
        out = UserError(_message(error))
        out.exit_code = getattr(error, "exit_code", 2)
        return out
    nested = list((getattr(error, "worker_failures", None) or {}).values())
    nested += [getattr(error, "controller_failure", None), error.__cause__, error.__context__]
    for inner in nested:
        if isinstance(inner, BaseException) and inner is not error:
            found = user_error_in(inner, _depth + 1)
            if found is not None:
                return found
    return None
