"""`evaluate(cfg)`: implicit metrics → generation → scoring → XSTest → judge → reports.

Each part runs when its inputs are configured and can be used alone:
    safedpo-ray evaluate --model runs/r1 --data pku_test.jsonl generation.enabled=false   # implicit only
    safedpo-ray evaluate --model runs/r1 --data prompts.jsonl --cost-model beaver-cost --reward-model beaver-reward
    safedpo-ray evaluate --model runs/r1 --xstest xstest_prompts.csv implicit.enabled=false
    safedpo-ray evaluate --generations eval/e1/generations.jsonl --cost-model c --reward-model r  # scoring only

Resumable: an evaluation directory keeps what it computed (cache.py), keyed by each model's path
and the settings that change its results; running with the same `--name` (or `--resume DIR`)
reuses every generation, score, implicit metric and judge verdict already there and computes
only what is missing. A fully cached run does not even start Ray. results.json is rewritten
after every part, so a later failure (e.g. the judge's endpoint going down) never loses what was
already measured.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from safedpo_ray.config.evaluation import EvalConfig, dump_yaml
from safedpo_ray.evaluate.cache import EvalCache, generation_key, implicit_key, item_key, scorer_key
from safedpo_ray.evaluate.generate import check_engine, generate_with_ray, prompt_rows
from safedpo_ray.evaluate.implicit import load_pairs, read_source_rows, run_implicit_on_ray
from safedpo_ray.evaluate.judge import (
    JudgeError,
    judge_pairwise,
    judge_rows,
    judge_summary,
    judge_xstest,
    load_verdicts,
    pairwise_summary,
)
from safedpo_ray.evaluate.judge import item_key as verdict_key
from safedpo_ray.evaluate.metrics import counts, normalized_helpfulness, score_summary
from safedpo_ray.evaluate.refusal import classify_refusal
from safedpo_ray.evaluate.report import markdown_table, write_json, write_reports
from safedpo_ray.evaluate.scorers import score_with_ray
from safedpo_ray.evaluate.xstest import read_xstest, xstest_metrics
from safedpo_ray.models.resolve import EvalError, has_reference, resolve_model, resolve_models
from safedpo_ray.runtime.ray_env import RayRequest, ensure_ray
from safedpo_ray.runtime.storage import check_cluster_inputs
from safedpo_ray.runtime.storage import exists as storage_exists
from safedpo_ray.runtime.storage import is_remote, join, redact, staged_output_dir

NAN = math.nan


def _ray_request(cfg: EvalConfig) -> RayRequest:
    g, s = cfg.generation, cfg.scoring
    workers = max(g.num_actors, s.num_actors, 1)
    return RayRequest(num_workers=workers, cpus_per_worker=max(g.cpus_per_actor, s.cpus_per_actor),
                      use_gpu=(g.gpus_per_actor > 0 or s.gpus_per_actor > 0), address=cfg.ray.address,
                      local_num_cpus=cfg.ray.local_num_cpus)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}) + "\n")
    tmp.replace(path)


def _read_generations(path: str, label: str | None = None) -> list[dict[str, Any]]:
    """Rows of a generations .jsonl (ours or any with prompt/response); scores are recomputed.
    `label` names the model; else each row's 'model' field, else the file name."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"generations file {path} does not exist")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and not {"prompt", "response"} <= set(rows[0]):
        raise EvalError(f"{path}: generations need 'prompt' and 'response' fields")
    drop = ("cost", "reward", "refusal", "refusal_judge")
    return [{**{k: v for k, v in r.items() if k not in drop}, "model": label or r.get("model") or p.stem,
             "prompt_id": str(r.get("prompt_id", "")), "set": r.get("set") or "data",
             "truncated": bool(r.get("truncated"))} for r in rows]


def _absolute(value: str | None) -> str | None:
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def _absolute_paths(cfg: EvalConfig) -> None:
    cfg.model.paths = [_absolute(p) for p in cfg.model.paths]
    cfg.model.reference = _absolute(cfg.model.reference)
    cfg.data.source, cfg.data.prompts = _absolute(cfg.data.source), _absolute(cfg.data.prompts)
    cfg.xstest.csv = _absolute(cfg.xstest.csv)
    cfg.scoring.generations = [_absolute(p) for p in cfg.scoring.generations]
    b = cfg.scoring.baseline
    if b and ("/" in b or b.endswith(".jsonl")):  # a bare word stays a label
        cfg.scoring.baseline = _absolute(b)


def _loopback(url: str) -> bool:
    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


class Evaluation:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        s = cfg.scoring
        for key in ("cost_model", "reward_model"):  # checked before any work; absolute for remote actors
            value = getattr(s, key)
            if value and is_remote(value):  # each scoring actor fetches it on its own node
                if not storage_exists(join(value, "config.json")):
                    raise EvalError(f"scoring.{key} '{redact(value)}': no config.json there (expected a score "
                                    "model's directory, e.g. a train-scorer output)")
                continue
            if value and not Path(value).exists():
                raise EvalError(f"scoring.{key} '{value}' is not a local directory or a storage URI (hub ids are "
                                "never downloaded at run time: fetch them first, or train them with train-scorer)")
            if value:
                setattr(s, key, str(Path(value).resolve()))
        j = cfg.judge
        if j.enabled and j.api_key_env and not os.environ.get(j.api_key_env) and not _loopback(j.url):
            raise EvalError(f"judge.enabled: the environment variable {j.api_key_env} (judge.api_key_env) is not set; "
                            "set it, set judge.api_key_env=null for an endpoint without a key, or judge.enabled=false")
        _absolute_paths(cfg)  # config.yaml then resumes from any directory, and remote actors find them
        name = cfg.output.name or time.strftime("eval-%Y%m%d-%H%M%S")
        self.out_dir = (Path(cfg.output.dir) / name).resolve()
        self.cache = EvalCache(self.out_dir / "cache")
        self.specs = resolve_models(cfg.model.paths, cfg.model.labels, cfg.model.reference)
        self.file_rows: list[dict[str, Any]] = []
        sources: dict[str, str] = {}
        for path in s.generations:
            rows = _read_generations(path)
            self.file_rows += rows
            sources.update({r["model"]: path for r in rows if r["model"] not in sources})
        self.baseline_label, self.baseline_rows = self._baseline()
        self.results: dict[str, Any] = {
            "name": name, "out_dir": str(self.out_dir), "baseline": self.baseline_label,
            "models": {sp.label: {"model": sp.to_dict()} for sp in self.specs}, "parts": {},
            "decoding": self._decoding(), "scoring": self._scoring(),
        }
        if self.baseline_rows:
            self.results["models"].setdefault(self.baseline_label, {"model": {"generations": s.baseline}})
        for label, path in sources.items():
            self.results["models"].setdefault(label, {"model": {"generations": path}})
        for key in ("anchor_zero", "anchor_ten"):
            anchor = getattr(s, key)
            if anchor and anchor not in self.results["models"]:
                raise EvalError(f"scoring.{key} '{anchor}' is not one of the models: "
                                f"{', '.join(self.results['models'])} (name them with --label)")
        if s.anchor_zero and not s.reward_model:
            raise EvalError("scoring.anchor_zero/anchor_ten normalise the reward model's scores: set scoring.reward_model")
        pair_base = j.baseline or self.baseline_label
        if j.enabled and j.pairwise and j.baseline and j.baseline not in self.results["models"]:
            raise EvalError(f"judge.baseline '{j.baseline}' is not one of the models: {', '.join(self.results['models'])}")
        self.pairwise_baseline = pair_base
        self.generations: list[dict[str, Any]] = []
        self.prompts_asked: dict[str, int] = {}
        self._ray_started = False

    def _baseline(self) -> tuple[str | None, list[dict[str, Any]]]:
        b = self.cfg.scoring.baseline
        if not b:
            return None, []
        labels = [s.label for s in self.specs] + [r["model"] for r in self.file_rows]
        if b in labels:
            return b, []
        if b.endswith(".jsonl"):
            return "baseline", _read_generations(b, "baseline")
        spec = resolve_model(b)
        spec.label = spec.label if spec.label not in labels else f"baseline-{spec.label}"
        self.specs.append(spec)
        return spec.label, []

    def _decoding(self) -> dict[str, Any]:
        g, d = self.cfg.generation, self.cfg.data
        out = {"engine": g.engine, "max_new_tokens": g.max_new_tokens, "max_prompt_length": d.max_prompt_length,
               "do_sample": g.do_sample, "weights_dtype": self.cfg.model.dtype,
               "stop_tokens": "tokenizer EOS + the model's generation_config eos_token_id"}
        if g.do_sample:
            out.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed)
        return out

    def _scoring(self) -> dict[str, Any]:
        s, o = self.cfg.scoring, self.cfg.output
        return {"cost_model": s.cost_model, "reward_model": s.reward_model, "dtype": s.dtype, "max_length": s.max_length,
                "harmless_threshold": s.harmless_threshold, "anchor_zero": s.anchor_zero, "anchor_ten": s.anchor_ten,
                "interval": f"{o.ci_level:.0%} percentile bootstrap, {o.ci_samples} resamples, seed {o.ci_seed}"}

    def _ci(self) -> dict[str, Any]:
        o = self.cfg.output
        return {"samples": o.ci_samples, "level": o.ci_level, "seed": o.ci_seed}

    def _ray(self) -> None:
        if not self._ray_started:
            ensure_ray(_ray_request(self.cfg))
            self._ray_started = True
            self._check_inputs_reach_every_node()

    def _check_inputs_reach_every_node(self) -> None:
        """On a cluster of several nodes, the actors that load models run on any node: a local
        model directory (a model, its adapter or reference, a score model) must show the same
        files on every node (a shared mount), else one sentence says to give a storage URI."""
        s = self.cfg.scoring
        check_cluster_inputs({"scoring.cost_model": s.cost_model, "scoring.reward_model": s.reward_model})
        for spec in self.specs:
            check_cluster_inputs({"--model": spec.path, "model.reference": spec.reference,
                                  "adapter": spec.adapter})

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "results.json", self.results)

    def _model(self, label: str) -> dict[str, Any]:
        return self.results["models"].setdefault(label, {})

    # -- parts ---------------------------------------------------------------------------------
    def implicit(self, source_rows: list[dict[str, Any]]) -> None:
        cfg = self.cfg
        pairs, stats = load_pairs(source_rows, cfg.data.schema)
        computed = reused = 0
        self.results["parts"]["implicit"] = {**stats, "computed": 0, "reused": 0}
        for spec in self.specs:
            if not has_reference(spec):
                self._model(spec.label)["implicit"] = {"skipped": "no reference model (set model.reference)"}
                continue
            key = implicit_key(spec, cfg.data, cfg.implicit, dtype=cfg.model.dtype)
            metrics = self.cache.implicit(key)
            if metrics is None:
                self._ray()
                print(f"[safedpo] implicit-reward metrics: {spec.label} ({len(pairs)} pairs)", flush=True)
                metrics = run_implicit_on_ray(
                    spec, pairs, num_gpus=cfg.generation.gpus_per_actor, num_cpus=cfg.generation.cpus_per_actor,
                    beta=cfg.implicit.beta, batch_size=cfg.implicit.batch_size, max_length=cfg.data.max_length,
                    max_prompt_length=cfg.data.max_prompt_length, dtype=cfg.model.dtype,
                    trust_remote_code=cfg.model.trust_remote_code, progress=cfg.output.progress)
                self.cache.add_implicit(key, metrics)
                computed += 1
            else:
                reused += 1
            self._model(spec.label)["implicit"] = metrics
            self.results["parts"]["implicit"] = {**stats, "computed": computed, "reused": reused}
            self.save()

    def generate(self, prompts: list[dict[str, Any]]) -> None:
        cfg, g = self.cfg, self.cfg.generation
        generated = reused = 0
        for spec in self.specs:
            key = generation_key(spec, g, max_prompt_length=cfg.data.max_prompt_length, dtype=cfg.model.dtype)
            done = self.cache.generations(key)
            missing = [p for p in prompts if p["prompt"] not in done]
            if missing:
                check_engine(g)
                self._ray()  # connected, and every node sees the models, before anything is announced
                print(f"[safedpo] generating: {spec.label} ({len(missing)} of {len(prompts)} prompts, {g.engine}, "
                      f"{g.num_actors} actors)", flush=True)
                rows = generate_with_ray(spec, missing, g, max_prompt_length=cfg.data.max_prompt_length,
                                         dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                         progress=cfg.output.progress)
                self.cache.add_generations(key, rows)  # kept before the next model starts
                done.update({r["prompt"]: {"response": r["response"], "truncated": r["truncated"]} for r in rows})
            generated += len(missing)
            reused += len(prompts) - len(missing)
            self.generations.extend({"model": spec.label, **p, **done[p["prompt"]]} for p in prompts)
            self.prompts_asked[spec.label] = len(prompts)
        self.results["parts"]["generation"] = {"prompts": len(prompts), "responses": len(self.generations),
                                               "generated": generated, "reused": reused}
        self.save()

    def score(self) -> None:
        s, cfg = self.cfg.scoring, self.cfg
        part: dict[str, Any] = {}
        items = [item_key(r) for r in self.generations]
        for kind, path in (("cost", s.cost_model), ("reward", s.reward_model)):
            if not path:
                for r in self.generations:
                    r[kind] = NAN
                continue
            key = scorer_key(path, dtype=s.dtype, max_length=s.max_length)
            done = self.cache.scores(key)
            todo: dict[str, dict[str, Any]] = {}
            for item, r in zip(items, self.generations):
                if item not in done:
                    todo.setdefault(item, r)
            if todo:
                self._ray()
                print(f"[safedpo] scoring {len(todo)} responses with the {kind} model", flush=True)
                scored = score_with_ray(
                    [{k: r.get(k) for k in ("prompt", "response", "truncated")} for r in todo.values()],
                    cost_model=path if kind == "cost" else None, reward_model=path if kind == "reward" else None,
                    batch_size=s.batch_size, max_length=s.max_length, num_actors=s.num_actors,
                    cpus_per_actor=s.cpus_per_actor, gpus_per_actor=s.gpus_per_actor, dtype=s.dtype,
                    trust_remote_code=cfg.model.trust_remote_code, progress=cfg.output.progress)
                new = [(item, row[kind]) for item, row in zip(todo, scored)]
                self.cache.add_scores(key, new)
                done.update(new)
            for item, r in zip(items, self.generations):
                r[kind] = done.get(item, NAN)
            part[kind] = {"scored": len(todo), "reused": len(set(items)) - len(todo)}
        self.results["parts"]["scoring"] = part
        _write_jsonl(self.out_dir / "generations.jsonl", self.generations)
        self.save()

    def summarize(self) -> None:
        """Scores, normalised helpfulness and counts per model."""
        s = self.cfg.scoring
        data_rows = [r for r in self.generations if r.get("set") == "data"]
        rewards_of = {}
        for label in self.results["models"]:
            rewards_of[label] = {r["prompt"]: r.get("reward", NAN) for r in data_rows if r["model"] == label}
        base = None
        if self.baseline_label:
            base = rewards_of.get(self.baseline_label) or {}
        scored = bool(s.cost_model or s.reward_model)
        for label in self.results["models"]:
            mine = [r for r in self.generations if r["model"] == label]
            if not mine:
                continue
            self._model(label)["counts"] = counts(self.prompts_asked.get(label, len(mine)), mine,
                                                  need_cost=bool(s.cost_model), need_reward=bool(s.reward_model))
            data = [r for r in mine if r.get("set") == "data"]
            if data and scored:
                # the baseline against itself ties everywhere: win rate 0.5, where the plot expects it
                summary = score_summary(data, base, s.harmless_threshold, ci=self._ci())
                if s.anchor_zero:
                    try:
                        summary.update(normalized_helpfulness(rewards_of[label], rewards_of[s.anchor_zero],
                                                              rewards_of[s.anchor_ten]))
                    except ValueError as exc:
                        raise EvalError(f"helpfulness anchors {s.anchor_zero}/{s.anchor_ten}: {exc}") from None
                self._model(label)["scores"] = summary
        self.save()

    def xstest(self) -> None:
        for r in self.generations:
            if r.get("set") == "xstest":
                r["refusal"] = classify_refusal(str(r.get("response", "")))
        for label in self.results["models"]:
            rows = [r for r in self.generations if r["model"] == label and r.get("set") == "xstest"]
            if rows:
                self._model(label)["xstest"] = xstest_metrics(rows, cost_threshold=self.cfg.scoring.harmless_threshold)
        _write_jsonl(self.out_dir / "generations.jsonl", self.generations)
        self.save()

    def _pairs(self) -> list[dict[str, Any]]:
        data = [r for r in self.generations if r.get("set") == "data"]
        base = {r["prompt"]: r["response"] for r in data if r["model"] == self.pairwise_baseline}
        return [{**r, "baseline_response": base[r["prompt"]]} for r in data
                if r["model"] != self.pairwise_baseline and r["prompt"] in base]

    def judge(self) -> None:
        j, path, progress = self.cfg.judge, self.out_dir / "judge.jsonl", self.cfg.output.progress
        data = [r for r in self.generations if r.get("set") == "data"]
        xs = [r for r in self.generations if r.get("set") == "xstest"]
        part: dict[str, Any] = {"verdicts": str(path)}
        self.results["parts"]["judge"] = part
        try:
            if j.rate and data:
                print(f"[safedpo] judge: rating {len(data)} responses at {j.url}", flush=True)
                part["rate"] = "running"
                verdicts = judge_rows(data, j, path, progress=progress)
                for label in self.results["models"]:
                    mine = [v for r, v in zip(data, verdicts) if r["model"] == label]
                    if mine:
                        self._model(label)["judge"] = judge_summary(mine)
                part["rate"] = "done"
            pairs = self._pairs() if j.pairwise else []
            if pairs:
                print(f"[safedpo] judge: comparing {len(pairs)} answers with {self.pairwise_baseline}'s", flush=True)
                part["pairwise"] = "running"
                outcomes = judge_pairwise(pairs, j, path, progress=progress)
                for label in self.results["models"]:
                    mine = [o for p, o in zip(pairs, outcomes) if p["model"] == label]
                    if mine:
                        self._model(label)["judge_pairwise"] = {"baseline": self.pairwise_baseline,
                                                                **pairwise_summary(mine, self._ci())}
                part["pairwise"] = "done"
            if j.xstest and xs:
                print(f"[safedpo] judge: labelling {len(xs)} XSTest responses", flush=True)
                part["xstest"] = "running"
                for r, label in zip(xs, judge_xstest(xs, j, path, progress=progress)):
                    r["refusal_judge"] = label
                self.xstest()
                part["xstest"] = "done"
        except JudgeError as exc:
            part.update({"error": str(exc), "completed": exc.completed, "total": exc.total})
            if part.get("rate") == "running":  # keep what the verdicts already made say
                done = load_verdicts(path)
                for label in self.results["models"]:
                    kept = [done[k] for k in (verdict_key(r, j.model) for r in data if r["model"] == label) if k in done]
                    if any(r["model"] == label for r in data):
                        self._model(label)["judge"] = {**judge_summary(kept), "incomplete": True}
            self.save()
            raise
        self.save()

    # -- all -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        source_rows = read_source_rows(cfg.data)
        prompts = prompt_rows(cfg.data, source_rows) if (cfg.data.source or cfg.data.prompts) else []
        prompts += read_xstest(cfg.xstest.csv, cfg.xstest.max_prompts) if cfg.xstest.csv else []
        want_implicit = cfg.implicit.enabled and bool(source_rows) and any(has_reference(s) for s in self.specs)
        want_generation = cfg.generation.enabled and bool(prompts) and bool(self.specs)
        if not (self.specs or self.baseline_rows or self.file_rows):
            raise EvalError("nothing to evaluate: give --model (model dirs or run dirs) or --generations files")
        if not (want_implicit or want_generation or self.file_rows):
            raise EvalError("nothing to do: give --data (pairs and/or prompts) or --xstest, and a model "
                            "(implicit metrics also need a reference: a run dir or model.reference)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.save()
        if want_implicit:
            self.implicit(source_rows)
        if want_generation:
            self.generate(prompts)
        self.generations += self.file_rows + self.baseline_rows
        if self.generations:
            _write_jsonl(self.out_dir / "generations.jsonl", self.generations)
            if cfg.scoring.cost_model or cfg.scoring.reward_model:
                self.score()
            self.summarize()
            self.xstest()
            if cfg.judge.enabled:
                try:
                    self.judge()
                finally:
                    self.results["files"] = write_reports(self.results, self.out_dir, cfg.output.compare)
        self.results["files"] = write_reports(self.results, self.out_dir, cfg.output.compare)
        write_json(self.out_dir / "results.json", self.results)
        return self.results


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every configured part; results.json/results.md/tradeoff.png land in output.dir/name."""
    with staged_output_dir(cfg.output) as remote:  # output.dir=s3://...: staged here, uploaded after
        results = Evaluation(cfg).run()
    if remote:
        results["out_dir"] = remote
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = ["", "== SafeDPO evaluation ==", markdown_table(results.get("models", {}), results.get("baseline"))]
    for kind, path in (results.get("files") or {}).items():
        lines.append(f"{kind}: {path}")
    return "\n".join(lines)
