"""
bench.py: the benchmark suite (issue 21): clips x models x seeds under one fixed protocol, one table.

    python data/make_clips.py                                             # the four suite clips in clips/ (once)
    python bench.py --models full,V1,V2,V3,V4,V5 --seeds 0,1 --jobs 2 --out runs/bench
    python bench.py --clips bikes64,carphone --extra "--lr 5e-3" --out runs/bench_lr   # an experiment
    python bench.py --out runs/bench --report-only                        # rebuild the tables only

Each run is the real CLI in a subprocess with one thread (OMP_NUM_THREADS=1), --jobs of them side by side:

    python tenerv.py --frames DIR --params P --epochs E --seed S [--ablation V] --out OUT/<clip>/<model>_s<seed>

Its output goes to log.txt in that folder. A finished run with the protocol's settings is reused, one
with only a checkpoint is resumed, one finished with other settings is left alone (never overwritten).
Writes OUT/suite.csv (a row per run) and OUT/suite.md (per clip a row per model, full - model by seed).
"""
import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import fields

import torch

import tenerv

TENERV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tenerv.py")
SUITE = ("bbb320", "bikes64", "carphone", "bikes250")  # built by data/make_clips.py; recipes in data/README.md
MODELS = ("full",) + tenerv.ABLATIONS                   # full TeNeRV and the variants of Table III
SET_BY_BENCH = ("--frames", "--params", "--epochs", "--seed", "--ablation", "--out", "--resume")
CSV_FIELDS = ("clip", "model", "seed", "psnr", "msssim", "s_per_epoch", "decode_fps", "params", "epochs",
              "gop_boundaries")

# Reference figures, float PSNR in dB: measured with the peers' public code at 0.30M parameters, 50 epochs,
# float PSNR (mean of per-frame RGB PSNR), one thread, 2-core VM, their own training recipes; see the
# README's "Benchmark suite" (and issue 21). Shown only under the same protocol and for the same clip.
REFERENCE_PARAMS, REFERENCE_EPOCHS = 300_000, 50
REFERENCE_PSNR = {
    "bbb320": {"HiNeRV": 29.92, "HNeRV": 24.24},
    "bikes64": {"HiNeRV": 35.20, "HNeRV": 30.22},
    "carphone": {"HiNeRV": 35.81, "HNeRV": 29.53},
}

Run = namedtuple("Run", "clip model seed frames n_frames out")


def make_parser():
    p = argparse.ArgumentParser(description="Run clips x models x seeds of tenerv.py under one protocol; "
                                "write OUT/suite.csv and OUT/suite.md.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clips", default=",".join(SUITE), help="name=DIR,...; a bare name is CLIPS_DIR/name")
    p.add_argument("--clips-dir", default="clips", help="folder of the suite clips (python data/make_clips.py)")
    p.add_argument("--models", default="full", help="comma-separated, of " + ",".join(MODELS))
    p.add_argument("--seeds", default="0,1", help="comma-separated integers")
    p.add_argument("--params", default="0.3M", help="parameters of every model, e.g. 0.3M, 300K")
    p.add_argument("--epochs", type=int, default=50, help="epochs of every run (both stages)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--out", default="runs/bench", help="suite folder: OUT/<clip>/<model>_s<seed>, suite.csv, suite.md")
    p.add_argument("--extra", default="", help='further tenerv.py flags for every run, e.g. "--strides 2,2"')
    p.add_argument("--report-only", action="store_true", help="train nothing; rebuild the tables from finished runs")
    return p


# -----------------------------------------------------------------------------
# The protocol: which runs, and when a finished run counts

def plan(args):
    """Check the flags and clips up front; returns the list of runs."""
    tenerv.parse_params(args.params)
    if args.epochs < 1 or args.jobs < 1:
        raise ValueError(f"--epochs {args.epochs} --jobs {args.jobs}: both must be at least 1")
    models = list(dict.fromkeys(m for m in args.models.split(",") if m))
    if not models or set(models) - set(MODELS):
        raise ValueError(f"--models {args.models}: expected a comma-separated list of {','.join(MODELS)}")
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s))
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1") from None
    extra = shlex.split(args.extra)
    if any(flag.split("=")[0] in SET_BY_BENCH for flag in extra):
        raise ValueError(f"--extra {args.extra!r}: bench.py sets {' '.join(SET_BY_BENCH)} itself; use its own flags")
    unknown = tenerv.make_parser().parse_known_args(["--frames", "x", *extra])[1]
    if unknown:
        raise ValueError(f"--extra {args.extra!r}: tenerv.py has no flag {' '.join(unknown)} (python tenerv.py --help)")
    runs, items = [], [c for c in args.clips.split(",") if c]
    names = [item.partition("=")[0] for item in items]
    if not items or len(set(names)) < len(names):
        raise ValueError(f"--clips {args.clips!r}: expected name=DIR,... (or names in --clips-dir), each name once")
    for item in items:
        clip, _, path = item.partition("=")
        path = path or os.path.join(args.clips_dir, clip)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--clips {item}: {path} is not a folder; give name=DIR, or build the suite "
                                    f"clips with: python data/make_clips.py --out {args.clips_dir}")
        n_frames = sum(name.lower().endswith(tenerv.IMAGE_EXTENSIONS) for name in os.listdir(path))
        if n_frames == 0:
            raise ValueError(f"--clips {item}: {path} holds no .png/.jpg/.jpeg frames")
        runs += [Run(clip, model, seed, path, n_frames, os.path.join(args.out, clip, f"{model}_s{seed}"))
                 for model in models for seed in seeds]
    return runs


def protocol(args, run):
    """The config fields a finished run must have: the protocol's, and every config field --extra sets."""
    want = dict(params=tenerv.parse_params(args.params), epochs=args.epochs, seed=run.seed,
                ablation="" if run.model == "full" else run.model, n_frames=run.n_frames)
    parser, extra = tenerv.make_parser(), shlex.split(args.extra)
    values = parser.parse_args(["--frames", run.frames, *extra])
    for key in {flag.split("=")[0][2:].replace("-", "_") for flag in extra if flag.startswith("--")}:
        if key not in {f.name for f in fields(tenerv.TeNeRVConfig)}:
            continue  # --device, --save-frames: not settings of the model
        value = getattr(values, key)
        if value != parser.get_default(key):  # a default (e.g. --gops 0) is derived, so the config holds another value
            want[key] = [int(s) for s in value.split(",")] if key == "strides" else value  # as metrics.json has it
    return want


def status(args, run):
    """'done', 'resume' (a checkpoint, no metrics.json), 'new', or why the folder cannot be used."""
    meta = os.path.join(run.out, "metrics.json")
    if os.path.exists(meta):
        with open(meta) as f:
            config = json.load(f).get("config", {})
        diff = [f"{k} {config.get(k)!r}, not {v!r}" for k, v in protocol(args, run).items() if config.get(k) != v]
        return "done" if not diff else (f"{meta}: finished with other settings ({'; '.join(diff)}); "
                                        "left alone: remove the folder or use another --out")
    return "resume" if os.path.exists(os.path.join(run.out, "ckpt.pt")) else "new"


def train(args, run, resume):
    """One run of the real CLI, one thread, output to its log; returns (ok, log path, seconds)."""
    cmd = [sys.executable, TENERV, "--frames", run.frames, "--params", args.params, "--epochs", str(args.epochs),
           "--seed", str(run.seed), *(["--ablation", run.model] if run.model != "full" else []), "--out", run.out,
           *shlex.split(args.extra), *(["--resume"] if resume else [])]
    line = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + shlex.join(cmd)
    print(("resume: " if resume else "run: ") + line, flush=True)
    os.makedirs(run.out, exist_ok=True)
    log_path, start = os.path.join(run.out, "log.txt"), time.time()
    with open(log_path, "a") as log:  # appended: a resumed run keeps the log of its first part
        log.write(f"$ {line}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")).returncode
    return rc == 0 and status(args, run) == "done", log_path, time.time() - start


# -----------------------------------------------------------------------------
# The tables

def collect(args, runs):
    rows = []
    for run in runs:
        if status(args, run) != "done":
            continue
        with open(os.path.join(run.out, "metrics.json")) as f:
            m = json.load(f)
        rows.append(dict(clip=run.clip, model=run.model, seed=run.seed, psnr=round(m["psnr"], 4),
                         msssim=round(m["msssim"], 5), s_per_epoch=round(m["seconds_per_epoch"], 2),
                         decode_fps=round(m["decode_fps"], 1), params=m["params"], epochs=m["epochs"],
                         gop_boundaries=json.dumps(m["gop_boundaries"]), size=f"{m['config']['width']}x"
                         f"{m['config']['height']}"))
    return rows


def machine():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def per_seed(values, spec=".2f"):
    return " / ".join("–" if v is None else format(v, spec) for v in values)


def mean(rows, key, digits):
    return f"{statistics.mean(r[key] for r in rows):.{digits}f}" if rows else "–"


def clip_table(clip, models, seeds, by):
    """Markdown rows of one clip: one per model; full - model paired by seed (seeds where both finished)."""
    lines = []
    for model in models:
        got, full = ([by.get((clip, m, s)) for s in seeds] for m in (model, "full"))
        done = [r for r in got if r]
        delta = [f["psnr"] - r["psnr"] if f and r else None for f, r in zip(full, got)]
        paired = [d for d in delta if d is not None]
        spread = f" ± {statistics.stdev(paired):.2f}" if len(paired) > 1 else ""
        cells = [model, per_seed([r and r["psnr"] for r in got]), mean(done, "psnr", 2), mean(done, "msssim", 4),
                 mean(done, "s_per_epoch", 1), mean(done, "decode_fps", 1)]
        cells += ["", ""] if model == "full" else [per_seed(delta, "+.2f"),
                                                   f"{statistics.mean(paired):+.2f}{spread}" if paired else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(args, runs, rows, argv):
    with open(os.path.join(args.out, "suite.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    seeds = list(dict.fromkeys(run.seed for run in runs))
    by = {(r["clip"], r["model"], r["seed"]): r for r in rows}
    reference = tenerv.parse_params(args.params) == REFERENCE_PARAMS and args.epochs == REFERENCE_EPOCHS
    md = ["# Benchmark suite", "", f"    python bench.py {shlex.join(argv)}", "",
          f"Protocol: --params {args.params}, --epochs {args.epochs}, seeds {args.seeds}, one thread per "
          f"run (OMP_NUM_THREADS=1), {args.jobs} runs side by side; further tenerv.py flags: {args.extra or 'none'}.  ",
          f"Machine: {machine()}.  ",
          "PSNR: float, mean of per-frame RGB PSNR (dB). full − model: paired by seed; ± is the standard "
          "deviation of the paired differences over seeds. s/epoch depends on what ran beside it.", ""]
    for clip in dict.fromkeys(run.clip for run in runs):
        first = next(run for run in runs if run.clip == clip)
        size = next((", " + r["size"] for r in rows if r["clip"] == clip), "")
        md += [f"## {clip}: {first.n_frames} frames{size} ({first.frames})", "",
               f"| model | PSNR seed {per_seed(seeds, 'd')} (dB) | mean PSNR | MS-SSIM | s/epoch | decode frames/s "
               f"| full − model, seed {per_seed(seeds, 'd')} (dB) | mean ± sd |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        md += clip_table(clip, list(dict.fromkeys(run.model for run in runs)), seeds, by)
        for peer, psnr in REFERENCE_PSNR.get(clip, {}).items() if reference else ():
            md.append(f"| {peer} (its public code, reference) | | {psnr:.2f} | | | | | |")
        md.append("")
    missing = [run.out for run in runs if (run.clip, run.model, run.seed) not in by]
    if missing:
        md += ["Not finished (no row): " + ", ".join(missing), ""]
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write("\n".join(md))
    print(f"{len(rows)} of {len(runs)} runs in the tables -> {args.out}/suite.csv, {args.out}/suite.md")


# -----------------------------------------------------------------------------

def bench(args, argv):
    """Run what is missing (unless --report-only), write the tables; returns the number of failed runs."""
    runs, todo, failed = plan(args), [], 0
    for run in runs:
        state = status(args, run)
        if state == "done":
            print(f"reusing {run.out}: finished with the same protocol")
        elif state in ("new", "resume"):
            todo.append((run, state == "resume"))
        else:
            print(f"not run: {state}")
            failed += not args.report_only
    if args.report_only:
        print(f"--report-only: {len(todo)} runs not finished are left out")
    elif todo:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(train, args, run, resume): run for run, resume in todo}
            for future in as_completed(futures):
                run, (ok, log_path, seconds) = futures[future], future.result()
                if ok:
                    print(f"done {run.out} in {seconds:.0f} s")
                    continue
                failed += 1
                with open(log_path) as f:
                    tail = f.read().splitlines()[-5:]
                print(f"FAILED {run.out} after {seconds:.0f} s; log {log_path}, last lines:")
                print("\n".join("    " + line for line in tail))
    os.makedirs(args.out, exist_ok=True)
    write_report(args, runs, collect(args, runs), argv)
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    try:
        failed = bench(args, argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if failed:
        sys.exit(f"error: {failed} run(s) failed or were left alone (see above)")


if __name__ == "__main__":
    main()
