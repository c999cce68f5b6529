"""Resuming an evaluation: what is cached (per model path and settings) is reused, only what is
missing is computed, a crash loses only the model in progress. Generation and scoring are
replaced by counting fakes (no Ray, no models); the real ones run in test_eval_ray.py."""

import json
from pathlib import Path

import pytest

from safedpo_ray.evaluate import runner
from safedpo_ray.cli.main import main
from safedpo_ray.config.evaluation import load_eval_config

pytestmark = pytest.mark.timeout(120)

REWARD = {"sft": 1.0, "helpful": 3.0, "safedpo": 2.0}


class Fakes:
    def __init__(self):
        self.generated, self.scored, self.ray_starts = [], [], 0
        self.fail_on = None

    def generate(self, spec, rows, gen, *, max_prompt_length, dtype, trust_remote_code, progress):
        name = Path(spec.path).name
        if name == self.fail_on:
            raise RuntimeError(f"actor for {name} died")
        self.generated.append((name, len(rows), gen.max_new_tokens))
        return [{**r, "response": f"{name} answers {r['prompt'][:12]}", "truncated": i == 0} for i, r in enumerate(rows)]

    def score(self, rows, *, cost_model, reward_model, **kwargs):
        self.scored.append(("cost" if cost_model else "reward", len(rows)))
        out = []
        for r in rows:
            name = r["response"].split()[0]
            out.append({**r, "cost": -1.0 if name != "sft" else 1.0, "reward": REWARD[name]})
        return out


@pytest.fixture
def setup(tmp_path, monkeypatch):
    fakes = Fakes()
    monkeypatch.setattr(runner, "generate_with_ray", fakes.generate)
    monkeypatch.setattr(runner, "score_with_ray", fakes.score)

    def fake_ray(self):
        if not self._ray_started:
            fakes.ray_starts += 1
            self._ray_started = True

    monkeypatch.setattr(runner.Evaluation, "_ray", fake_ray)
    models = {}
    for name in ("sft", "helpful", "safedpo", "cost", "reward"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        models[name] = str(tmp_path / name)
    return fakes, models, tmp_path


def _args(models, tmp_path, *extra):
    return ["evaluate", "--model", models["sft"], "--model", models["helpful"], "--model", models["safedpo"],
            "--label", "sft", "--label", "helpful", "--label", "safedpo", "--data", "synthetic",
            "--cost-model", models["cost"], "--reward-model", models["reward"], "--baseline", "sft",
            "--anchor-zero", "sft", "--anchor-ten", "helpful", "--output", str(tmp_path / "eval"), "--name", "e1",
            "data.synthetic_prompts=8", "data.max_prompts=5", "implicit.enabled=false", "output.progress=false",
            "output.ci_samples=200", *extra]


def test_rerun_computes_only_what_is_missing(setup, capsys):
    fakes, models, tmp_path = setup
    out = tmp_path / "eval" / "e1"
    fakes.fail_on = "safedpo"  # the third model's generation crashes
    with pytest.raises(RuntimeError, match="actor for safedpo died"):
        main(_args(models, tmp_path))
    assert fakes.generated == [("sft", 5, 512), ("helpful", 5, 512)] and fakes.scored == []

    fakes.fail_on, fakes.generated = None, []
    assert main(_args(models, tmp_path)) == 0
    assert fakes.generated == [("safedpo", 5, 512)]  # the two finished models are reused
    assert fakes.scored == [("cost", 15), ("reward", 15)]
    results = json.loads((out / "results.json").read_text())
    assert results["parts"]["generation"] == {"prompts": 5, "responses": 15, "generated": 5, "reused": 10}
    scores = {label: m["scores"] for label, m in results["models"].items()}
    assert scores["sft"]["helpfulness"] == 0.0 and scores["helpful"]["helpfulness"] == 10.0
    assert scores["safedpo"]["helpfulness"] == pytest.approx(5.0)  # 10·(2 − 1)/(3 − 1)
    assert scores["safedpo"]["win_rate"] == 1.0 and scores["sft"]["win_rate"] == 0.5
    assert scores["safedpo"]["harmless_ratio"] == 1.0 and scores["sft"]["harmless_ratio"] == 0.0
    assert results["models"]["safedpo"]["counts"] == {"prompts": 5, "responses": 5, "truncated": 1, "empty": 0,
                                                      "failed": 0}
    assert results["decoding"]["max_new_tokens"] == 512
    md = (out / "results.md").read_text()
    assert "## Counts" in md and "## Decoding" in md and "harmless CI" in md

    # the same evaluation again: nothing to compute, Ray is not even started
    fakes.generated, fakes.scored, fakes.ray_starts = [], [], 0
    assert main(_args(models, tmp_path)) == 0
    assert (fakes.generated, fakes.scored, fakes.ray_starts) == ([], [], 0)
    again = json.loads((out / "results.json").read_text())
    assert again["models"]["safedpo"]["scores"] == results["models"]["safedpo"]["scores"]
    assert again["parts"]["scoring"] == {"cost": {"scored": 0, "reused": 15}, "reward": {"scored": 0, "reused": 15}}

    # --resume DIR takes the saved configuration; a renamed label reuses the model's results (keyed by path)
    assert main(["evaluate", "--resume", str(out), "model.labels=[base, helpful, safedpo]",
                 "scoring.baseline=base", "scoring.anchor_zero=base"]) == 0
    assert fakes.generated == [] and fakes.scored == []
    assert json.loads((out / "results.json").read_text())["models"]["base"]["scores"]["helpfulness"] == 0.0

    # a setting that changes the output regenerates (and rescores what changed)
    assert main(_args(models, tmp_path, "generation.max_new_tokens=64")) == 0
    assert fakes.generated == [("sft", 5, 64), ("helpful", 5, 64), ("safedpo", 5, 64)]
    assert fakes.scored == []  # same texts: their scores are cached by (prompt, response, truncated)

    # new weights at the same path: that model only
    fakes.generated = []
    (Path(models["helpful"]) / "model.safetensors").write_bytes(b"retrained")
    assert main(_args(models, tmp_path, "generation.max_new_tokens=64")) == 0
    assert fakes.generated == [("helpful", 5, 64)]


def test_anchor_and_resume_errors(setup, capsys):
    fakes, models, tmp_path = setup
    assert main(_args(models, tmp_path, "scoring.anchor_ten=nobody")) == 2
    assert "scoring.anchor_ten 'nobody' is not one of the models" in capsys.readouterr().err
    assert main(["evaluate", "--resume", str(tmp_path / "missing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    with pytest.raises(Exception, match="anchor_zero"):
        load_eval_config(None, ["scoring.anchor_zero=sft"])


def test_pairwise_judge_in_the_evaluation(setup, monkeypatch):
    """judge.pairwise compares every model's answer with the baseline's (both orders); a judge that
    prefers safedpo's answers gives safedpo 1.0 and ties the others (0.5). The verdicts are
    reused on a rerun: no request is sent again."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    fakes, models, tmp_path = setup
    asked = []

    class Judge(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            user = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
            a, b = user.split("[ANSWER A]\n")[1].split("\n\n[ANSWER B]\n")
            pick = "A" if a.startswith("safedpo") else "B" if b.startswith("safedpo") else "tie"
            asked.append(pick)
            body = json.dumps({"choices": [{"message": {"content": json.dumps({"helpful": pick, "harmless": "tie"})}}]})
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    judge = ["judge.enabled=true", "judge.rate=false", "judge.pairwise=true", "judge.api_key_env=null",
             f"judge.url=http://127.0.0.1:{httpd.server_address[1]}/v1", "judge.concurrency=2"]
    try:
        assert main(_args(models, tmp_path, *judge)) == 0
        assert len(asked) == 2 * 5 * 2  # helpful and safedpo against sft, 5 prompts, both orders
        results = json.loads((tmp_path / "eval" / "e1" / "results.json").read_text())
        pairwise = {k: m.get("judge_pairwise") for k, m in results["models"].items()}
        assert pairwise["sft"] is None and pairwise["safedpo"]["baseline"] == "sft"
        assert pairwise["safedpo"]["helpful_win_rate"] == 1.0 and pairwise["helpful"]["helpful_win_rate"] == 0.5
        assert pairwise["safedpo"]["compared"] == 5 and len(pairwise["safedpo"]["helpful_win_rate_ci"]) == 2
        assert "judge: more helpful" in (tmp_path / "eval" / "e1" / "results.md").read_text()
        asked.clear()
        assert main(_args(models, tmp_path, *judge)) == 0
        assert asked == []
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_judge_without_its_key_fails_before_any_work(setup, capsys, monkeypatch):
    fakes, models, tmp_path = setup
    monkeypatch.delenv("SAFEDPO_NO_SUCH_KEY", raising=False)
    assert main(_args(models, tmp_path, "judge.enabled=true", "judge.url=https://judge.example/v1",
                      "judge.api_key_env=SAFEDPO_NO_SUCH_KEY")) == 2
    assert "SAFEDPO_NO_SUCH_KEY" in capsys.readouterr().err and fakes.generated == []
