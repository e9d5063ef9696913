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

It also holds the speed benchmark of `tenerv.py --bench` (issue 25): `speed` times a few training steps of
each stage and a decoding pass, counts MACs per pixel and projects the training time:

    python tenerv.py --bench --frames data/bbb320 --params 0.3M [--compile] [--out speed.json]
    python tenerv.py --bench --synthetic 1920x1080x600 --params 3M --device cuda    # no data needed
"""
import argparse
import csv
import functools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, fields, replace

import torch

import tenerv
import video

TENERV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tenerv.py")
SUITE = ("bbb320", "bikes64", "carphone", "bikes250")  # built by data/make_clips.py; recipes in data/README.md
MODELS = ("full",) + tenerv.ABLATIONS                   # full TeNeRV and the variants of Table III
SET_BY_BENCH = ("--frames", "--params", "--epochs", "--seed", "--ablation", "--out", "--resume")
CSV_FIELDS = ("clip", "model", "seed", "psnr", "msssim", "s_per_epoch", "decode_fps", "params", "epochs",
              "gop_boundaries", "patches")

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
        n_frames = sum(name.lower().endswith(video.IMAGE_EXTENSIONS) for name in os.listdir(path))
        if n_frames == 0:
            raise ValueError(f"--clips {item}: {path} holds no .png/.jpg/.jpeg frames")
        runs += [Run(clip, model, seed, path, n_frames, os.path.join(args.out, clip, f"{model}_s{seed}"))
                 for model in models for seed in seeds]
    return runs


def protocol(args, run):
    """The config fields a finished run must have: the protocol's, and every setting of the model that the
    flags (--extra, else tenerv.py's defaults) give, so that a run made before a default changed is not
    reused under the new one. Derived settings (--strides, --depths, --expansions, --gops, --min-gop
    left empty or 0) are compared only when --extra sets them."""
    want = dict(params=tenerv.parse_params(args.params), epochs=args.epochs, seed=run.seed,
                ablation="" if run.model == "full" else run.model, n_frames=run.n_frames)
    parser, extra = tenerv.make_parser(), shlex.split(args.extra)
    values = parser.parse_args(["--frames", run.frames, *extra])
    listed = ("strides", "depths", "expansions")  # as metrics.json has them
    for key in {f.name for f in fields(tenerv.TeNeRVConfig)} & set(vars(values)) - set(want):
        value = getattr(values, key)
        if key in listed + ("gops", "min_gop") and value == parser.get_default(key):
            continue  # derived: the config holds the value it was derived to
        want[key] = [int(s) for s in value.split(",")] if key in listed else value
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
                         gop_boundaries=json.dumps(m["gop_boundaries"]), patches=m.get("patches", m["config"]["patches"]),
                         size=f"{m['config']['width']}x"
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
        P = sorted({r["patches"] for r in rows if r["clip"] == clip})  # --patches 0 chose it from the frames
        size += f", trained on {' or '.join(map(str, P))} patch{'es' if P != [1] else ''} per frame" if P else ""
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
# Speed: tenerv.py --bench (issue 25). Times what train() and reconstruct() run; trains no model to keep.

SYNTHETIC_POOL = 8     # distinct random frames of --synthetic, indexed modulo: 600 frames of 1080p would be 3.7 GB
WARMUP_STEPS = 2       # steps per stage left out of the timing (the first compiles with --compile)
DECODE_BATCH = 4       # frames per forward pass, reconstruct()'s default
PAPER_FRAMES, PAPER_EPOCHS = 600, 300  # Table II: 600 frames of 1080p, 300 epochs


def parse_synthetic(text):
    """'1920x1080x600' -> (W, H, T)."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"--synthetic {text!r}: expected WxHxT (width, height in pixels, frames), e.g. 1920x1080x600")
    W, H, T = map(int, m.groups())
    if min(W, H) < video.MIN_SIDE or T < 1:
        raise ValueError(f"--synthetic {text}: needs frames of at least {video.MIN_SIDE}x{video.MIN_SIDE} px, "
                         f"and at least 1 frame")
    return W, H, T


def speed_frames(args):
    """Check the flags of tenerv.py --bench up front; returns (frames or None for --synthetic, (T, H, W))."""
    for flag, given in (("--resume", args.resume), ("--save-frames", args.save_frames)):
        if given and args.bench:
            raise ValueError(f"--bench {flag}: the benchmark trains no run to continue or save; drop {flag}")
    if args.compile and not args.bench:
        raise ValueError("--compile: only with --bench so far (training and decoding in tenerv.py run eagerly); "
                         "add --bench")
    if not (args.bench or args.dry_run):
        raise ValueError("--synthetic: random frames, only to benchmark (--bench) or size a model (--dry-run)")
    if args.frames is None and args.synthetic is None:
        raise ValueError("--bench: pass --frames DIR, or --synthetic WxHxT for random frames, e.g. 1920x1080x600")
    if args.frames is not None and args.synthetic is not None:
        raise ValueError(f"--frames {args.frames} --synthetic {args.synthetic}: pass one of the two")
    if args.bench_steps < 1:
        raise ValueError(f"--bench-steps {args.bench_steps}: must be at least 1")
    if args.out and args.bench:
        tenerv.check_writable(args.out, "--out", folder=False)
        if os.path.exists(args.out) and not args.force:
            raise ValueError(f"--out {args.out}: exists; pass another --out, or add --force to overwrite it")
    if args.synthetic:
        W, H, T = parse_synthetic(args.synthetic)
        return None, (T, H, W)
    frames = tenerv.load_frames(args.frames, args.size, args.matrix)
    return frames, (frames.shape[0], *frames.shape[2:])


def fallback(fast, slow, log, what):
    """fast(*args); if its first call raises, one line and slow(*args) from then on. torch.compile compiles
    at the first call (the backward at the first backward), which is where a missing C++ compiler shows."""
    first = True

    def call(*args):
        nonlocal fast, first
        if first:
            first = False
            try:
                return fast(*args)
            except Exception as e:  # dynamo, inductor and the C++ compiler raise many types
                log(f"--compile: {what} failed to compile ({type(e).__name__}: "
                    f"{(str(e).strip().splitlines() or [''])[0][:160]}); running it eagerly")
                fast = slow
                return slow(*args)
        return fast(*args)
    call.compiled = lambda: fast is not slow
    return call


def maybe_compile(fn, compile, log, what):
    """torch.compile(fn), or fn itself (without compile, or with one line if torch.compile is unavailable).
    dynamic=False: one graph per shape; the GoP-specific depthwise conv folds the batch into its groups, and
    every timed batch has the same size. Compiling happens at the first call: see fallback."""
    if not compile:
        return fn
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # e.g. a Python version torch.compile does not support yet
        log(f"--compile: torch.compile is unavailable ({type(e).__name__}: {str(e).strip()[:160]}); "
            f"running {what} eagerly")
        return fn


def make_train_step(model, optimizer, cfg, device, l1_only, compile, log):
    """train()'s step up to optimizer.step(): forward (bf16 on CUDA), loss, backward; with compile the
    forward and loss are compiled (and their backward, through AOTAutograd), the optimizer runs eagerly."""
    use_amp = device.type == "cuda"

    def forward_loss(t, target):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = model(t)
        out = out.float()
        return out, tenerv.distortion(out, target, cfg, l1_only=l1_only)

    def step(forward_loss, t, target):
        out, loss = forward_loss(t, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return out, loss

    what = f"the stage-{model.stage} training step"
    fast, eager = maybe_compile(forward_loss, compile, log, what), functools.partial(step, forward_loss)
    return eager if fast is forward_loss else fallback(functools.partial(step, fast), eager, log, what)


def time_stage(model, optimizer, pool, cfg, device, n_steps, compile, log):
    """Seconds per training step of the model's stage, after WARMUP_STEPS; full batches of a random order
    of the frames, as train() takes them (in stage 2 one grouped conv per depthwise layer, whatever GoPs
    a batch mixes)."""
    E1, E_l1 = min(cfg.epochs, tenerv.stage1_epochs(cfg)), tenerv.l1_only_epochs(cfg)
    l1_only = (0 if model.stage == 1 else E1) < E_l1  # the loss of the stage's first epoch
    step = make_train_step(model, optimizer, cfg, device, l1_only, compile, log)
    T, B = cfg.n_frames, min(cfg.batch_size, cfg.n_frames)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(cfg.seed))
    batches = [b for b in order.split(B) if len(b) == B]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tot_loss = torch.zeros((), dtype=torch.float64, device=device)
    tot_psnr = torch.zeros((), dtype=torch.float64, device=device)
    warm = time.perf_counter()
    for i in range(WARMUP_STEPS + n_steps):
        if i == WARMUP_STEPS:
            sync()
            start = time.perf_counter()
        t = batches[i % len(batches)].to(device)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * g["scale"]
        target = pool[t % len(pool)].float() / 255
        out, loss = step(t, target)
        optimizer.step()
        tot_loss += loss.detach() * len(t)  # the running sums of train(), read once at the end
        tot_psnr += tenerv.psnr(out.detach().clamp(0, 1), target).sum()
    tot_loss.item()
    sync()
    seconds = (time.perf_counter() - start) / n_steps
    return dict(s_per_step=seconds, warmup_s=start - warm, frames_per_step=B, l1_only=l1_only,
                s_per_epoch_per_100_frames=seconds * 100 / B, compiled=getattr(step, "compiled", lambda: False)())


@torch.no_grad()
def time_decode(model, device, n_batches, compile, log):
    """Frames per second of reconstruct()'s forward pass (no loss, no copy back), after one warm-up batch."""
    model.eval()
    fast = maybe_compile(model, compile, log, "decoding")
    decode = model if fast is model else fallback(fast, model, log, "decoding")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    T, B = model.cfg.n_frames, min(DECODE_BATCH, model.cfg.n_frames)
    batches = [b for b in torch.arange(T).split(B) if len(b) == B]
    for i in range(1 + n_batches):
        if i == 1:
            sync()
            start = time.perf_counter()
        t = batches[i % len(batches)].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            decode(t).float().clamp(0, 1)
    sync()
    fps = n_batches * B / (time.perf_counter() - start)
    model.train()
    return fps, n_batches * B, getattr(decode, "compiled", lambda: False)()


def macs_per_pixel(cfg):
    """MACs of the stage-2 forward pass of one frame per pixel (H x W of the video), counted by
    FlopCounterMode: convolutions and matrix products (MACs = FLOPs / 2); elementwise ops (LayerNorm,
    GELU, the grids' interpolation) are not counted. On the meta device: shapes only, no compute."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = tenerv.TeNeRV(cfg, stage=2)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, dtype=torch.long, device="meta"))
    return counter.get_total_flops() / 2 / (cfg.height * cfg.width)


def peak_memory(device):
    """(MB, what was measured): allocated tensors on CUDA, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "torch.cuda.max_memory_allocated"
    import resource  # Unix only
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / 2 ** (20 if sys.platform == "darwin" else 10), \
        "peak RSS of the process, resource.getrusage: Python, torch and the frames included"


def seconds_per_epoch(cfg, stage1, stage2, n_epochs, n_frames=100):
    """Training steps only (no evaluation, no checkpoints) of one epoch of n_frames at this frame size,
    averaged over n_epochs: each stage for its share of them (stage1_epochs)."""
    E1 = min(n_epochs, tenerv.stage1_epochs(replace(cfg, epochs=n_epochs)))
    per_100 = (E1 * stage1["s_per_epoch_per_100_frames"] + (n_epochs - E1) * stage2["s_per_epoch_per_100_frames"])
    return per_100 / n_epochs * n_frames / 100


def speed(cfg, frames, device, compile=False, steps=5, log=print):
    """Time `steps` training steps of stage 1, then of stage 2 (split_gops into cfg.gops GoPs of equal
    length) and `steps` decoding batches; count MACs per pixel. frames: uint8 (T, 3, H, W), or None for
    SYNTHETIC_POOL random frames of cfg's size (frame t is pool[t % pool size]). Returns the figures."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if frames is None:
        frames = torch.randint(0, 256, (min(SYNTHETIC_POOL, cfg.n_frames), 3, cfg.height, cfg.width),
                               dtype=torch.uint8, generator=torch.Generator().manual_seed(cfg.seed))
    pool = frames.to(device)
    torch.manual_seed(cfg.seed)
    model = tenerv.TeNeRV(cfg).to(device)
    model.channels_last = device.type == "cuda"  # as train() and reconstruct() do
    optimizer = tenerv.make_optimizer(model, device)
    stage1 = time_stage(model, optimizer, pool, cfg, device, steps, compile, log)
    boundaries = tenerv.equal_gops(cfg.n_frames, cfg.gops)  # the content does not change the cost
    optimizer = tenerv.split_model(model, optimizer, boundaries, device)  # a new model: compiled anew
    trying = compile and stage1["compiled"]  # after one failure (one line said so) no more attempts
    stage2 = time_stage(model, optimizer, pool, cfg, device, steps, trying, log)
    trying = trying and stage2["compiled"]
    decode_fps, decode_frames, decode_compiled = time_decode(model, device, steps, trying, log)
    memory_mb, memory_kind = peak_memory(device)
    T, E = cfg.n_frames, cfg.epochs
    return dict(
        n_frames=T, width=cfg.width, height=cfg.height, params=tenerv.count_params(cfg), gops=cfg.gops,
        device=str(device), threads=torch.get_num_threads(), machine=machine(), compile=compile,
        steps=steps, warmup_steps=WARMUP_STEPS, stage1=stage1, stage2=stage2,
        epochs=E, stage1_epochs=min(E, tenerv.stage1_epochs(cfg)),
        s_per_epoch_per_100_frames=seconds_per_epoch(cfg, stage1, stage2, E),
        decode_fps=decode_fps, decode_frames=decode_frames, decode_batch=min(DECODE_BATCH, T),
        decode_compiled=decode_compiled, peak_memory_mb=memory_mb, peak_memory_kind=memory_kind,
        frames_on_device_mb=T * 3 * cfg.height * cfg.width / 2 ** 20,  # train() moves all frames there
        macs_per_pixel=macs_per_pixel(cfg), macs_counted="one frame's forward pass: convolutions and matrix "
        "products counted by FlopCounterMode, MACs = FLOPs / 2; elementwise ops not counted",
        projected_s_paper=PAPER_EPOCHS * seconds_per_epoch(cfg, stage1, stage2, PAPER_EPOCHS, PAPER_FRAMES),
        projected_s_clip=E * seconds_per_epoch(cfg, stage1, stage2, E, T), config=asdict(cfg))


def figure(x):
    """3 significant digits, without the e+03 of large numbers."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def print_speed(r, log=print):
    size, hms = f"{r['width']}x{r['height']}", tenerv.hms
    for k in (1, 2):
        s = r[f"stage{k}"]
        gops = f" ({tenerv.plural(r['gops'], 'GoP')})" if k == 2 else ""
        log(f"stage {k}{gops}: {figure(s['s_per_step'])} s/step of {tenerv.plural(s['frames_per_step'], 'frame')} "
            f"(mean of {r['steps']}; {r['warmup_steps']} warm-up steps took {figure(s['warmup_s'])} s; "
            f"{'L1' if s['l1_only'] else 'L1 + MS-SSIM'} loss{', compiled' if s['compiled'] else ''}): "
            f"{figure(s['s_per_epoch_per_100_frames'])} s/epoch per 100 frames")
    log(f"both stages ({r['stage1_epochs']} + {r['epochs'] - r['stage1_epochs']} of {r['epochs']} epochs): "
        f"{figure(r['s_per_epoch_per_100_frames'])} s/epoch per 100 frames")
    log(f"decode: {figure(r['decode_fps'])} frames/s ({r['decode_frames']} frames in batches of {r['decode_batch']}, "
        f"forward only{', compiled' if r['decode_compiled'] else ''})")
    log(f"peak memory: {r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']}); a training run also keeps the "
        f"{r['n_frames']} frames on the device: {figure(r['frames_on_device_mb'])} MB")
    log(f"MACs per pixel: {r['macs_per_pixel']:.0f} ({r['macs_counted']})")
    log(f"projected training (steps only, {size}, {r['device']}, {tenerv.plural(r['threads'], 'thread')}): "
        f"{PAPER_FRAMES} frames x {PAPER_EPOCHS} epochs {hms(r['projected_s_paper'])}"
        + ("" if (r["n_frames"], r["epochs"]) == (PAPER_FRAMES, PAPER_EPOCHS) else
           f"; these {r['n_frames']} frames x {r['epochs']} epochs {hms(r['projected_s_clip'])}"))


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
