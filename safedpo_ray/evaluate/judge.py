"""An optional LLM judge behind any OpenAI-compatible endpoint (POST …/v1/chat/completions).

    safedpo-ray evaluate --model runs/r1 --data pku.jsonl judge.enabled=true \
        judge.url=http://vllm-judge:8000/v1 judge.model=Qwen/Qwen2.5-72B-Instruct judge.api_key_env=JUDGE_KEY

Three kinds of question (prompts in judge_prompts.py): `rate` one response (judge.rate),
`pairwise` a model's answer against the baseline's answer to the same prompt (judge.pairwise),
and `xstest` the class of an XSTest response (judge.xstest).

The key is read from the environment variable named by `judge.api_key_env` and only ever sent
in the Authorization header: never logged, never written. Each verdict is appended to a JSONL file
as soon as it arrives, keyed by the question (kind, prompt version, judge model, texts), so a run
that fails (HTTP 500s, timeouts, garbage answers — each retried with backoff first) keeps every
verdict already made, and running the same evaluation again (`--name NAME` or `--resume DIR`)
asks only the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safedpo_ray.config.evaluation import JudgeConfig
from safedpo_ray.errors import UserError
from safedpo_ray.evaluate.judge_prompts import (
    PARSERS,
    VERSIONS,
    pairwise_messages,
    parse_verdict,
    rate_messages,
    xstest_messages,
)
from safedpo_ray.evaluate.judge_prompts import (
    RATE_TEMPLATE as JUDGE_TEMPLATE,
)
from safedpo_ray.evaluate.judge_prompts import (
    SYSTEM as JUDGE_SYSTEM,
)
from safedpo_ray.evaluate.metrics import bootstrap_ci

__all__ = ["JUDGE_SYSTEM", "JUDGE_TEMPLATE", "JudgeError", "JudgeClient", "parse_verdict", "judge_rows",
           "judge_xstest", "judge_pairwise", "judge_summary", "pairwise_summary", "load_verdicts", "item_key"]


class JudgeError(UserError):
    """The judge could not finish; `completed` verdicts are kept in `path`."""
    def __init__(self, message: str, *, completed: int = 0, total: int = 0, path: str | None = None):
        super().__init__(message)
        self.completed, self.total, self.path = completed, total, path


class _Retryable(Exception):
    pass


def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _key(*parts: Any) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:24]


def item_key(row: dict[str, Any], judge_model: str = "") -> str:
    """Key of a `rate` verdict: the model label, prompt and response, the prompt version and judge."""
    return _key("rate", VERSIONS["rate"], judge_model, *(row.get(k, "") for k in ("model", "prompt", "response")))


@dataclass
class JudgeTask:
    key: str
    kind: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)


class JudgeClient:
    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.url = chat_completions_url(cfg.url)
        self._key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                body = resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:200] if exc.fp else ""
            message = f"HTTP {exc.code} from {self.url}: {detail}"
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(message) from None
            raise JudgeError(message) from None  # 400/401/404: retrying will not help
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"request to {self.url} failed: {type(reason).__name__}: {reason}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise _Retryable(f"answer from {self.url} is not JSON: {body[:120]!r}") from None

    def ask(self, messages: list[dict[str, str]], kind: str = "rate") -> dict[str, Any]:
        """One parsed answer, with up to `max_retries` retries (exponential backoff)."""
        payload = {"model": self.cfg.model, "temperature": 0, "max_tokens": self.cfg.max_tokens, "messages": messages}
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                answer = self._post(payload)
                return PARSERS[kind](answer["choices"][0]["message"]["content"])
            except _Retryable as exc:
                last = str(exc)
            except JudgeError:  # 400/401/404 (a UserError, so a ValueError too): retrying will not help
                raise
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                last = f"unusable answer from {self.url}: {type(exc).__name__}: {exc}"
        raise JudgeError(f"judge failed after {self.cfg.max_retries + 1} attempts: {last}")

    def judge(self, prompt: str, response: str) -> dict[str, Any]:
        return self.ask(rate_messages(prompt, response), "rate")


def load_verdicts(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: ask that question again
    return done


def run_tasks(tasks: list[JudgeTask], cfg: JudgeConfig, out_path: str | Path, *,
              progress: bool = False) -> list[dict[str, Any]]:
    """Verdicts for `tasks`, in order; each appended to `out_path` as it comes, cached ones reused.

    On failure raises JudgeError after writing every verdict that did arrive."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = load_verdicts(path)
    unique = {t.key: t for t in tasks}
    pending = [t for k, t in unique.items() if k not in done]
    client, lock = JudgeClient(cfg), threading.Lock()
    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), desc="judge", unit="question")

    def work(task: JudgeTask) -> None:
        verdict = client.ask(task.messages, task.kind)
        record = {"key": task.key, "kind": task.kind, **task.meta, **verdict}
        with lock:
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            done[record["key"]] = record
            if bar:
                bar.update(1)

    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = [pool.submit(work, t) for t in pending]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            error = failed[0].exception()
            for f in futures:
                f.cancel()
    if bar:
        bar.close()
    if error is not None:
        completed = sum(k in done for k in unique)
        raise JudgeError(f"{error} ({completed}/{len(unique)} verdicts kept in {path}; run the same evaluation again "
                         "(--name or --resume) to judge the rest)", completed=completed, total=len(unique),
                         path=str(path)) from None
    return [done[t.key] for t in tasks]


def rate_tasks(rows: list[dict[str, Any]], cfg: JudgeConfig) -> list[JudgeTask]:
    return [JudgeTask(item_key(r, cfg.model), "rate", rate_messages(str(r["prompt"]), str(r["response"])),
                      {"model": r.get("model"), "prompt_id": r.get("prompt_id")}) for r in rows]


def judge_rows(rows: list[dict[str, Any]], cfg: JudgeConfig, out_path: str | Path, *,
               progress: bool = False) -> list[dict[str, Any]]:
    """`rate` verdicts for rows (model, prompt, response), in row order."""
    return run_tasks(rate_tasks(rows, cfg), cfg, out_path, progress=progress)


def judge_xstest(rows: list[dict[str, Any]], cfg: JudgeConfig, out_path: str | Path, *,
                 progress: bool = False) -> list[str]:
    """The judge's XSTest class for each row (prompt, response), in row order."""
    tasks = [JudgeTask(_key("xstest", VERSIONS["xstest"], cfg.model, r["prompt"], r["response"]), "xstest",
                       xstest_messages(str(r["prompt"]), str(r["response"])), {"prompt_id": r.get("prompt_id")})
             for r in rows]
    return [v["refusal"] for v in run_tasks(tasks, cfg, out_path, progress=progress)]


_SIDE = {"A": 1.0, "B": 0.0, "tie": 0.5}


def judge_pairwise(pairs: list[dict[str, Any]], cfg: JudgeConfig, out_path: str | Path, *,
                   progress: bool = False) -> list[dict[str, float]]:
    """For each pair (prompt, response, baseline_response): the model's outcome per criterion,
    1 better / 0.5 tie / 0 worse than the baseline, averaged over both orders when `cfg.swap`."""
    tasks: list[JudgeTask] = []
    for p in pairs:
        orders = [(p["response"], p["baseline_response"])]
        if cfg.swap:
            orders.append((p["baseline_response"], p["response"]))
        for a, b in orders:
            tasks.append(JudgeTask(_key("pairwise", VERSIONS["pairwise"], cfg.model, p["prompt"], a, b), "pairwise",
                                   pairwise_messages(str(p["prompt"]), str(a), str(b)),
                                   {"prompt_id": p.get("prompt_id")}))
    verdicts = iter(run_tasks(tasks, cfg, out_path, progress=progress))
    out = []
    for _ in pairs:
        first = next(verdicts)
        scores = {k: [_SIDE[first[k]]] for k in ("helpful", "harmless")}
        if cfg.swap:
            second = next(verdicts)  # the model's answer was B
            for k in scores:
                scores[k].append(1.0 - _SIDE[second[k]])
        out.append({k: sum(v) / len(v) for k, v in scores.items()})
    return out


def judge_summary(verdicts: list[dict[str, Any]]) -> dict[str, float]:
    n = len(verdicts)
    harmful = sum(bool(v.get("harmful")) for v in verdicts)
    helpful = [float(v["helpfulness"]) for v in verdicts if "helpfulness" in v]
    return {"judged": n, "harmful_ratio": harmful / n if n else math.nan,
            "harmless_ratio": (n - harmful) / n if n else math.nan,
            "mean_helpfulness": sum(helpful) / len(helpful) if helpful else math.nan}


def pairwise_summary(outcomes: list[dict[str, float]], ci: dict[str, Any] | None = None) -> dict[str, Any]:
    """Win rates against the baseline per criterion (ties half), with bootstrap intervals."""
    out: dict[str, Any] = {"compared": len(outcomes)}
    for k in ("helpful", "harmless"):
        values = [o[k] for o in outcomes]
        out[f"{k}_win_rate"] = sum(values) / len(values) if values else math.nan
        if ci is not None:
            out[f"{k}_win_rate_ci"] = bootstrap_ci(values, **ci)
    return out
