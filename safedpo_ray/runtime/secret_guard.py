"""Secrets come from the environment only, and go nowhere else.

An API key (the judge's), a Hugging Face token, object-store credentials: each is read from an
environment variable where it is used (`judge.api_key_env` names the judge's; HF_TOKEN, AWS_*,
GOOGLE_APPLICATION_CREDENTIALS... are read by the libraries themselves). They are never a value of
the configuration, so no saved config (`<run>/config.yaml`, a search's `best.yaml`, an
evaluation's `config.yaml`), result, log or job description can hold one:

- `check_config_tree` refuses, at load time, a configuration value that looks like a secret (a
  known token format, a password in a URL, a credential in a URL's query, an `*_env` key whose
  value is not a variable name), saying which environment variable to use instead. The message
  shows the value masked.
- `check_job_env` refuses to copy secret variables into a Ray Job's `runtime_env` (which the
  cluster keeps in its job table and shows on its dashboard); `assert_not_in` is the last check
  on what a job ships (entrypoint and runtime_env).
- `redact` hides the values of the secret variables set in this process; the console module
  passes every line it writes to a log file through it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qsl, urlsplit

from safedpo_ray.errors import UserError

# An environment variable whose value is a secret: a TOKEN, SECRET, PASSWORD, API_KEY... part of
# its name (TOKENIZERS_PARALLELISM is not: the part must end at '_' or the end of the name).
_SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|APIKEY|API_KEY|ACCESS_KEY|ACCESS_KEY_ID|PRIVATE_KEY|"
    r"ACCOUNT_KEY|SAS_TOKEN|SESSION_TOKEN)(_|$)|_KEY$",
    re.IGNORECASE,
)
# Values in well-known token formats, with the variable that should hold them.
_TOKEN_FORMATS = (
    (re.compile(r"^sk-[A-Za-z0-9_\-]{16,}$"), "the variable named by judge.api_key_env (default OPENAI_API_KEY)"),
    (re.compile(r"^hf_[A-Za-z0-9]{20,}$"), "HF_TOKEN"),
    (re.compile(r"^(AKIA|ASIA)[A-Z0-9]{16}$"), "AWS_ACCESS_KEY_ID (and AWS_SECRET_ACCESS_KEY)"),
    (re.compile(r"^(gh[pousr]_|github_pat_)[A-Za-z0-9_]{20,}$"), "an environment variable"),
    (re.compile(r"^xox[abprs]-[A-Za-z0-9-]{10,}$"), "an environment variable"),
    (re.compile(r"^eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*$"), "an environment variable"),
    (re.compile(r"^Bearer\s+\S+$", re.IGNORECASE), "an environment variable"),
)
# URL query parameters that carry credentials (pyarrow's s3 options, SAS tokens, signatures...).
_SECRET_QUERY = re.compile(r"secret|token|password|passwd|credential|signature|^sig$|^key$|_key$|apikey",
                           re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIN_SECRET = 8  # values shorter than this (a test's "testing", a flag) are too common to look for


def is_secret_name(name: str) -> bool:
    """True for an environment variable name that holds a secret (HF_TOKEN, OPENAI_API_KEY,
    AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD...)."""
    return bool(_SECRET_NAME.search(name))


def mask(value: str) -> str:
    """A secret shown in a message: its first characters only."""
    value = str(value)
    return (value[:3] + "…") if len(value) > 6 else "…"


def _env_hint(key: str, scheme: str = "") -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "storage_path" or scheme in ("s3", "gs", "gcs", "abfs", "abfss", "hdfs"):
        return ("the store's own environment variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                "AWS_SESSION_TOKEN, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY) or an "
                "instance role")
    if "mlflow" in leaf:
        return "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
    if key.startswith("judge."):
        return "the environment variable named by judge.api_key_env (default OPENAI_API_KEY)"
    return "an environment variable"


def literal_secret_problem(key: str, value: str) -> str | None:
    """Why `value` of config key `key` must not be there (None: fine). The message masks it."""
    text = str(value).strip()
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith("_env"):
        if not _ENV_NAME.match(text) or any(p.match(text) for p, _ in _TOKEN_FORMATS):
            return (f"'{key}' names the environment variable that holds the secret (e.g. OPENAI_API_KEY), "
                    f"got '{mask(text)}', which is not a variable name: put the secret in an environment "
                    f"variable and give its name here")
        return None
    for pattern, env in _TOKEN_FORMATS:
        if pattern.match(text):
            return (f"'{key}' looks like a secret ('{mask(text)}'): secrets are never configuration values "
                    f"(configs are saved with the run); set {env} in the environment instead")
    if "://" in text:
        try:
            parts = urlsplit(text)
            password = parts.password
        except ValueError:
            return None
        if password:
            return (f"'{key}' has a password in its URL ({parts.scheme}://{parts.username}:***@…): "
                    f"configs are saved with the run; give credentials through {_env_hint(key, parts.scheme)}")
        secret = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_QUERY.search(name)]
        if secret:
            return (f"'{key}' carries a credential in its URL query ({', '.join(f'{n}=***' for n in secret)}): "
                    f"configs are saved with the run; give it through {_env_hint(key, parts.scheme)}")
    return None


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix.rstrip("."), tree


def check_config_tree(tree: dict[str, Any], error: type[Exception] = UserError) -> None:
    """Raise `error` for the first value of a raw config tree (YAML + overrides) that is a secret."""
    for key, value in _leaves(tree):
        if isinstance(value, str):
            problem = literal_secret_problem(key, value)
            if problem:
                raise error(problem)


def secret_values(environ: dict[str, str] | None = None, names: Iterable[str] = ()) -> list[str]:
    """Values of the secret variables set in `environ` (default: this process), longest first."""
    env = os.environ if environ is None else environ
    extra = set(names)
    found = {v for k, v in env.items() if v and len(v.strip()) >= _MIN_SECRET and (is_secret_name(k) or k in extra)}
    return sorted(found, key=len, reverse=True)


def redact(text: str, values: Iterable[str] | None = None) -> str:
    """`text` with the value of every secret environment variable replaced by ***."""
    for v in secret_values() if values is None else values:
        if v in text:
            text = text.replace(v, "***")
    return text


def check_job_env(env: dict[str, str], extra_secret_names: Iterable[str] = ()) -> None:
    """Refuse secret variables in a job's runtime_env: Ray keeps it in the cluster's job table and
    shows it on the dashboard. Secrets belong to the cluster's own environment."""
    extra = {n for n in extra_secret_names if n}
    for name, value in env.items():
        why = None
        if is_secret_name(name) or name in extra:
            why = f"{name} holds a secret"
        elif any(p.match(str(value).strip()) for p, _ in _TOKEN_FORMATS):
            why = f"the value of {name} looks like a secret"
        if why:
            raise UserError(
                f"--env {name}: {why}, and a job's environment is stored in the cluster's job table and shown "
                "on its dashboard, so secrets are never sent with a job. Give them to the cluster's nodes "
                "instead: KubeRay: the Secret the pods load (`safedpo-storage` in cluster/raycluster.yaml); "
                "cluster launcher: the nodes' environment or an instance role (cluster/README.md)")


def assert_not_in(obj: Any, what: str, values: Iterable[str] | None = None) -> None:
    """Raise if the value of a secret environment variable occurs anywhere in `obj` (e.g. a job's
    entrypoint and runtime_env)."""
    text = repr(obj)
    for v in secret_values() if values is None else values:
        if v in text:
            raise UserError(f"{what} would contain the value of a secret environment variable "
                            f"('{mask(v)}'); secrets are never sent with a job")
