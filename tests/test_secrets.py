"""Secrets come from the environment only: never a config value, never in a saved config, result,
log or job description (safedpo_ray/runtime/secret_guard.py; the train run's files: tests/test_console.py)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from safedpo_ray.cli.main import main as cli
from safedpo_ray.config.training import ConfigError, load_config
from safedpo_ray.errors import UserError
from safedpo_ray.config.evaluation import load_eval_config
from safedpo_ray.cli.jobs import DEFAULT_EXCLUDES, build_job
from safedpo_ray.runtime.secret_guard import is_secret_name, redact

pytestmark = pytest.mark.timeout(120)

FAKE = {"SAFEDPO_TEST_JUDGE_KEY": "sk-fakejudgekey-0123456789abcdef",
        "HF_TOKEN": "hf_fakehubtoken0123456789abcdefgh",
        "AWS_SECRET_ACCESS_KEY": "fake/aws/secret/0123456789"}


@pytest.fixture
def secrets_env(monkeypatch):
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return FAKE


def assert_nowhere(root: Path | None, *texts: str) -> int:
    """No file under root (and none of `texts`) holds a fake secret; returns the files read."""
    files = [f for f in root.rglob("*") if f.is_file()] if root else []
    for f in files:
        data = f.read_bytes()
        for name, value in FAKE.items():
            assert value.encode() not in data, f"{name} written to {f}"
    for text in texts:
        for name, value in FAKE.items():
            assert value not in text, f"{name} in the output"
    return len(files)


@pytest.mark.parametrize("loader,override,key,hint", [
    ("train", "run.storage_path=s3://b/p?endpoint_override=http://h:9000&secret_key=abcdef123", "run.storage_path",
     "AWS_SECRET_ACCESS_KEY"),
    ("train", "run.mlflow_tracking_uri=https://me:pa55word99@mlflow.example", "run.mlflow_tracking_uri",
     "MLFLOW_TRACKING_PASSWORD"),
    ("train", "data.source=hf_abcdefghijklmnopqrstuvwxyz012345", "data.source", "HF_TOKEN"),
    ("train", "model.name_or_path=sk-abcdefghijklmnopqrstuvwxyz", "model.name_or_path", "judge.api_key_env"),
    ("eval", "judge.api_key_env=sk-abcdefghijklmnopqrstuvwxyz", "judge.api_key_env", "environment variable"),
    ("eval", "judge.api_key_env=hf_abcdefghijklmnopqrstuvwxyz012345", "judge.api_key_env", "environment variable"),
    ("eval", "judge.url=https://judge.example/v1?api_key=abc123xyz", "judge.url", "judge.api_key_env"),
])
def test_a_literal_secret_in_a_config_is_refused(loader, override, key, hint):
    load = load_config if loader == "train" else load_eval_config
    with pytest.raises(ConfigError) as err:
        load(None, [override])
    message = str(err.value)
    assert f"'{key}'" in message and hint in message, message
    secret = override.split("=", 1)[1].split("secret_key=")[-1].split("api_key=")[-1].split(":", 2)[-1]
    assert secret not in message and "pa55word99" not in message  # the message masks it


def test_ordinary_values_pass():
    load_config(None, ["run.storage_path=s3://b/p?endpoint_override=http://h:9000&region=us-east-1",
                       "data.source=PKU-Alignment/PKU-SafeRLHF", "run.mlflow_tracking_uri=http://127.0.0.1:5000",
                       "model.name_or_path=HuggingFaceTB/SmolLM2-135M"])
    assert load_eval_config(None, ["judge.api_key_env=JUDGE_KEY"]).judge.api_key_env == "JUDGE_KEY"


def test_secret_names():
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
                 "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY", "JUDGE_KEY"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "DS_ACCELERATOR", "HF_HOME", "KEYBOARD", "AWS_DEFAULT_REGION"):
        assert not is_secret_name(name), name


def test_redact_hides_every_secret_value(secrets_env):
    line = f"Authorization: Bearer {FAKE['SAFEDPO_TEST_JUDGE_KEY']} token={FAKE['HF_TOKEN']}"
    assert redact(line) == "Authorization: Bearer *** token=***"


def test_jobs_never_carry_secrets(secrets_env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"HF_TOKEN={FAKE['HF_TOKEN']}\n")
    assert ".env" in DEFAULT_EXCLUDES  # the working dir's .env is not shipped
    job = build_job(["train", "train.max_steps=2"], working_dir=tmp_path, env={"DS_ACCELERATOR": "cpu"})
    shipped = json.dumps({"entrypoint": job["entrypoint"], "runtime_env": job["runtime_env"]})
    assert_nowhere(None, shipped)
    for env in ({"HF_TOKEN": FAKE["HF_TOKEN"]}, {"AWS_SECRET_ACCESS_KEY": "x"}, {"HARMLESS": FAKE["HF_TOKEN"]}):
        with pytest.raises(UserError, match="secrets are never sent with a job"):
            build_job(["train"], working_dir=tmp_path, env=env)
    # the variable the judge key is read from, whatever its name
    with pytest.raises(UserError, match="JUDGE holds a secret"):
        build_job(["evaluate", "--generations", "g.jsonl", "judge.api_key_env=JUDGE"], working_dir=tmp_path,
                  env={"JUDGE": "x"})
    # through the CLI: refused before any cluster is contacted, the value not printed
    capsys.readouterr()
    assert cli(["submit", "--address", "http://127.0.0.1:9", "--env", "HF_TOKEN", "--", "train"]) == 2
    out = capsys.readouterr()
    assert "--env HF_TOKEN" in out.err and "Secret" in out.err
    assert_nowhere(None, out.out, out.err)


class _Judge(BaseHTTPRequestHandler):
    auth: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        _Judge.auth.append(self.headers.get("Authorization"))
        content = json.dumps({"harmful": False, "helpfulness": 7})
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_evaluation_with_a_judge_writes_no_key(secrets_env, tmp_path, capsys):
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({"model": "m", "prompt_id": f"p{i}", "prompt": f"question {i}",
                                        "response": "an answer"}) + "\n" for i in range(3)))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Judge.auth = []
    try:
        code = cli(["evaluate", "--generations", str(gens), "--output", str(tmp_path / "eval"), "--name", "e",
                    "judge.enabled=true", f"judge.url=http://127.0.0.1:{httpd.server_address[1]}/v1",
                    "judge.api_key_env=SAFEDPO_TEST_JUDGE_KEY", "output.progress=false"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    out = capsys.readouterr()
    assert code == 0, out.err
    assert _Judge.auth == [f"Bearer {FAKE['SAFEDPO_TEST_JUDGE_KEY']}"] * 3  # sent where it belongs
    written = assert_nowhere(tmp_path / "eval", out.out, out.err)
    assert written >= 3 and (tmp_path / "eval" / "e" / "config.yaml").exists()
    assert "SAFEDPO_TEST_JUDGE_KEY" in (tmp_path / "eval" / "e" / "config.yaml").read_text()  # the name, not the key
