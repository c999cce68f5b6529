"""How preparation and training scale with the number of pairs: wall time, rows/s, peak memory.

    python benchmarks/data_scale.py                              # 50k, 200k and 1M rows
    python benchmarks/data_scale.py --sizes 50000 --no-trl --out /tmp/scale

For each size: PKU-shaped rows are written to a .jsonl file (the real rows of
../shared/data/pku_saferlhf/ with their prompts made unique when that folder exists, the
synthetic generator otherwise); then, each as its own command, as a user runs them:
  * `safedpo-ray prepare`  (streaming Ray Data pass into the prepared-pairs cache)
  * `safedpo-ray train train.max_steps=N` on the prepared pairs (the cache is reused)
  * `safedpo-ray train train.max_steps=N` on the raw rows in a fresh output directory: one
    command that prepares and trains, what a user runs first (compared with TRL's empty cache)
  * TRL's DPOTrainer on the same pairs after T, same tokenizer and tiny model (when trl is
    installed: `pip install -e .[bench]`)
Peak memory is sampled every --mem-period s (1 s) over the whole process tree of the command (Ray's processes
included): the sum of PSS (shared pages counted once) and the largest single process's RSS among
the training workers. The tokenizer alone (one process, the same tokenizer and prompt template)
is timed in the same run as the yardstick for preparation's rows/s: on both responses of every
row (the table's column), and on only the pairs T keeps, which is what preparation tokenizes (the
second table: the strict yardstick; T drops about a third of these rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pku_saferlhf" / "train_slice_40.jsonl"


def write_rows(path: Path, n: int) -> str:
    kind_file = path.with_suffix(".kind")
    if path.exists() and kind_file.exists():  # rows written by an earlier run of this benchmark
        return kind_file.read_text()
    if SHARED.exists():
        base = [json.loads(line) for line in SHARED.read_text().splitlines() if line.strip()]
        kind = f"real PKU rows ({SHARED.name}), prompts made unique"
    else:
        sys.path.insert(0, str(ROOT))
        from safedpo_ray.data.synthetic import make_synthetic_rows

        base = make_synthetic_rows(200, seed=0, split="train")
        kind = "synthetic rows"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            row = dict(base[i % len(base)])
            row["prompt"] = f"{row['prompt']} (#{i})"
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)
    kind_file.write_text(kind)
    return kind


class Watch:
    """Peak memory of a process tree, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.25):
        self.root = psutil.Process(pid)
        self.period, self.peak_pss, self.peak_rss, self.peak_worker = period, 0, 0, 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            pss = rss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    pss += info.pss
                    rss += info.rss
                    name = " ".join(p.cmdline()[:1])
                    if "RayTrainWorker" in name or "ray::RayTrainWorker" in p.name():
                        self.peak_worker = max(self.peak_worker, info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


MEM_PERIOD = 1.0  # s between memory sweeps (--mem-period)


def run(cmd: list[str], *, first_step_file: Path | None = None, log: Path, env: dict | None = None) -> dict:
    """Run a command, watching its memory; with `first_step_file`, also when a step was logged."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(log.parent),
                                env={**os.environ, **(env or {})})
        watch = Watch(proc.pid, period=MEM_PERIOD)
        first = None
        while proc.poll() is None:
            if first is None and first_step_file is not None and first_step_file.exists():
                if any('"loss"' in line for line in first_step_file.read_text().splitlines()):
                    first = time.perf_counter() - t0
            time.sleep(0.1)
        watch.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return {"wall_s": wall, "first_step_s": first, "peak_pss_gb": watch.peak_pss / 2**30,
            "peak_rss_gb": watch.peak_rss / 2**30, "peak_worker_rss_gb": watch.peak_worker / 2**30}


def tokenizer_rate(model_dir: str, data: Path, rows: int = 20000, max_length: int = 512,
                   kept_only: bool = False) -> float:
    """Rows/s of the tokenizer alone on the first `rows` rows (one process, the same template):
    transformers' tokenizer as training loads it (preparation's tasks call its Rust backend
    directly when that gives the same ids, data/task_tokenizer.py; this yardstick does not).

    The yardstick of the table tokenizes both responses of every row. Preparation tokenizes only
    the pairs T keeps (SafeDPO's T drops the rows whose responses are both unsafe: 37% of the rows
    written here), so that yardstick is lenient; `kept_only` tokenizes just the pairs T keeps and
    still counts every row read: the tokenizer doing exactly preparation's tokenizing."""
    sys.path.insert(0, str(ROOT))
    from safedpo_ray.data.tokenize import tokenize_pairs
    from safedpo_ray.data.transform import transform_with_outcome
    from safedpo_ray.models.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    batch = {"prompt": [], "chosen": [], "rejected": []}
    n = 0
    with data.open() as f:
        for _, line in zip(range(rows), f):
            r = json.loads(line)
            n += 1
            if kept_only:
                pair, _ = transform_with_outcome(r, "safedpo")
                if pair is None:
                    continue
                r = {"prompt": pair["prompt"], "response_0": pair["chosen"], "response_1": pair["rejected"]}
            batch["prompt"].append(r["prompt"])
            batch["chosen"].append(r["response_0"])
            batch["rejected"].append(r["response_1"])
    t0 = time.perf_counter()
    for i in range(0, len(batch["prompt"]), 1024):
        tokenize_pairs({k: v[i:i + 1024] for k, v in batch.items()}, tok, max_length=max_length,
                       max_prompt_length=max_length // 2)
    return n / (time.perf_counter() - t0)


TRL_SCRIPT = r'''
import json, sys, time
t0 = time.perf_counter()
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
data, model_dir, steps, out, stamp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
def T(r):  # SafeDPO's transformation; discarded pairs get an empty prompt and are filtered out
    w = r["better_response_id"]; l = 1 - w
    safe = [r["is_response_0_safe"], r["is_response_1_safe"]]
    resp = [r["response_0"], r["response_1"]]
    if not safe[w] and safe[l]: w, l = l, w
    keep = safe[w] or safe[l]
    return {"prompt": r["prompt"] if keep else "", "chosen": resp[w], "rejected": resp[l]}
ds = load_dataset("json", data_files=data, split="train")
ds = ds.map(T, remove_columns=ds.column_names).filter(lambda r: r["prompt"] != "")
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
class Stamp(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            open(stamp, "w").write(json.dumps({"loss": 0, "t": time.perf_counter() - t0}))
args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 max_length=512, learning_rate=1e-6, beta=0.1, logging_steps=1, report_to=[], use_cpu=True,
                 bf16=False, save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0)
DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Stamp()]).train()
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50000,200000,1000000")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--eval-fraction", type=float, default=0.002)
    ap.add_argument("--mem-period", type=float, default=MEM_PERIOD,
                    help="seconds between memory sweeps of the process tree (a sweep of our ~20 Ray processes "
                         "costs ~0.1 CPU-s: at 0.25 s it took a sizeable part of a 2-core machine from the command)")
    args = ap.parse_args()
    globals()["MEM_PERIOD"] = args.mem_period
    work = Path(args.out or tempfile.mkdtemp(prefix="safedpo-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("safedpo-ray"))
    try:
        import trl  # noqa: F401

        have_trl = not args.no_trl
    except ImportError:
        have_trl = False
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = work / f"rows_{n}.jsonl"
        kind = write_rows(data, n)
        out = work / f"out_{n}"
        # A held-out split of 0.2% (2,000 rows at 1M): the run's final held-out evaluation is a
        # forward pass over every held-out pair, which at the 5% default would dwarf two steps.
        common = [f"data.source={data}", f"run.output_dir={out}", "data.max_length=512",
                  "data.max_prompt_length=256", f"data.eval_fraction={args.eval_fraction}"]
        prep = run([exe, "prepare", *common, "run.name=prepare"], log=work / f"prepare_{n}.log")
        stats = json.loads((out / "prepare" / "data_stats.json").read_text())
        rows_read = sum(s["rows_read"] for s in stats.values())
        model_dir = str(out / "prepare" / "init-model")
        tok_rate = tokenizer_rate(model_dir, data)
        tok_kept_rate = tokenizer_rate(model_dir, data, kept_only=True)
        train = run([exe, "train", *common, "run.name=train", f"train.max_steps={args.steps}"],
                    first_step_file=out / "train" / "metrics.jsonl", log=work / f"train_{n}.log")
        # One command on the raw rows, as a user runs it: its own output directory, so nothing is
        # prepared or built yet (what TRL with an empty cache does below).
        raw_out = work / f"out_{n}_raw"
        shutil.rmtree(raw_out, ignore_errors=True)
        raw = run([exe, "train", *common[:1], f"run.output_dir={raw_out}", *common[2:], "run.name=train",
                   f"train.max_steps={args.steps}"],
                  first_step_file=raw_out / "train" / "metrics.jsonl", log=work / f"train_raw_{n}.log")
        row = {"rows": n, "data": kind, "prepare": prep, "prepare_rows_per_s": rows_read / prep["wall_s"],
               "tokenizer_rows_per_s": tok_rate, "tokenizer_kept_pairs_rows_per_s": tok_kept_rate, "train": train,
               "train_raw": raw}
        if have_trl:
            script = work / "trl_dpo.py"
            script.write_text(TRL_SCRIPT)
            # TRL twice on the same rows: with an empty `datasets` cache (reading, T and tokenizing
            # included: what our prepare + train do), then with that cache (what our train on
            # prepared pairs does).
            cache = work / f"hf-datasets-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            for key in ("trl", "trl_warm"):
                stamp = work / f"{key}_first_step_{n}.json"
                stamp.unlink(missing_ok=True)
                row[key] = run([sys.executable, str(script), str(data), model_dir, str(args.steps),
                                str(work / f"{key}_{n}"), str(stamp)], first_step_file=stamp,
                               log=work / f"{key}_{n}.log", env={"HF_DATASETS_CACHE": str(cache)})
        results.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results))


def table(results: list[dict]) -> str:
    head = ("| rows | prepare wall | prepare rows/s | tokenizer alone rows/s | ratio | prepare peak PSS (tree) "
            "| train wall | first step after | train peak PSS (tree) | one worker peak RSS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        p, t = r["prepare"], r["train"]
        lines.append(f"| {r['rows']:,} | {p['wall_s']:.0f} s | {r['prepare_rows_per_s']:,.0f} | "
                     f"{r['tokenizer_rows_per_s']:,.0f} | {r['prepare_rows_per_s'] / r['tokenizer_rows_per_s']:.2f} | "
                     f"{p['peak_pss_gb']:.2f} GB | {t['wall_s']:.0f} s | {t['first_step_s'] or float('nan'):.0f} s | "
                     f"{t['peak_pss_gb']:.2f} GB | {t['peak_worker_rss_gb']:.2f} GB |")
    if any("tokenizer_kept_pairs_rows_per_s" in r for r in results):  # the strict yardstick (tokenizer_rate)
        lines += ["", "| rows | tokenizer alone on T's pairs only, rows read/s | prepare / that |", "|---|---|---|"]
        for r in results:
            if "tokenizer_kept_pairs_rows_per_s" in r:
                k = r["tokenizer_kept_pairs_rows_per_s"]
                lines.append(f"| {r['rows']:,} | {k:,.0f} | {r['prepare_rows_per_s'] / k:.2f} |")
    if any("trl" in r for r in results):
        nan = float("nan")
        lines += ["", "| rows | TRL first step, empty `datasets` cache | ours: `train` on the raw rows, first step | "
                  "TRL / ours | ours: prepare, then train | TRL first step, warm cache | ours: first step on "
                  "prepared pairs | TRL / ours | TRL peak PSS | ours: `train` on the raw rows, peak PSS |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            if "trl" in r:
                cold, warm, t = r["trl"]["first_step_s"] or nan, (r.get("trl_warm") or {}).get("first_step_s") or nan, \
                    r["train"]["first_step_s"] or nan
                raw = r.get("train_raw") or {}
                one = raw.get("first_step_s") or nan
                lines.append(f"| {r['rows']:,} | {cold:.0f} s | {one:.0f} s | {cold / one:.2f}× | "
                             f"{r['prepare']['wall_s'] + t:.0f} s | {warm:.0f} s | {t:.0f} s | {warm / t:.2f}× | "
                             f"{r['trl']['peak_pss_gb']:.2f} GB | {raw.get('peak_pss_gb', nan):.2f} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
