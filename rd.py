"""
rd.py: where TeNeRV stands against x264, x265 and VVC on your own frames.

    python rd.py --frames data/bbb320 --params 0.05M,0.1M,0.2M,0.4M --epochs 50 --out runs/rd
    python rd.py --frames clip/ --tnrv a.tnrv,b.tnrv --out runs/rd_clip   # score files you already have
    python rd.py --frames clip/ --params 0.1M,0.2M,0.4M --ablation V1,V2,V3,V4,V5 --codecs ""   # Table III
    python rd.py --frames clip/ --params 0.3M --bits 8,6 --lambda 0,0.01,0.05 --codecs ""        # bits and λ

For every budget in --params, TeNeRV is trained with tenerv.py's defaults (a finished run in
OUT/tenerv_<budget> with the same configuration is reused), compressed by compress.py (QAT, then
the built-in coder) and decoded from the file. The same frames go through ffmpeg: x264 and x265
(preset veryslow), x265 without B-frames (as the T-NeRV supplement reports it), and VVC (libvvenc)
where the ffmpeg build has it, at every --crf (VVC: the same numbers as QP).

How it counts (the same function for every codec):
- bpp = 8 * bytes / (T * H * W). A codec's bytes are its raw elementary stream (.264/.265/.266, no
  container) with its SEI NAL units removed: they hold the encoder's version and options (x264
  ~0.7 kB; x265 ~2.3 kB, switched off with info=0 and removed anyway), not pictures. The stripped
  stream is what gets decoded and scored. TeNeRV's bytes are its whole .tnrv file, header included.
- Chroma: the codecs get 4:2:0 (--chroma 444: 4:4:4) planes made from the RGB frames with BT.709,
  limited range, a 2x2 mean for chroma. TeNeRV codes RGB, i.e. 4:4:4.
- PSNR, RGB: against the original RGB frames; codec output goes back to RGB as tenerv.py reads
  .yuv files (nearest chroma upsampling). TeNeRV output is rounded to 8 bits, as decoded PNGs are.
- PSNR, YUV: (6 PSNR_Y + PSNR_U + PSNR_V) / 8 on the 4:2:0 (or 4:4:4) planes, TeNeRV's output
  converted exactly as the originals were. Every PSNR is a mean over frames of per-frame PSNR.
- MS-SSIM: RGB, tenerv.msssim (below 161 px, fewer scales with renormalised weights).
- BD-rate and BD-PSNR (Bjontegaard, VCEG-M33): a cubic (fewer points: degree points - 1) of log
  rate in PSNR per curve, integrated over the PSNR range both curves cover. BD-rate < 0 means
  TeNeRV needs fewer bits than the codec for the same PSNR; no common range, no number.

With --ablation, each variant of Table III is trained, compressed and decoded at the same budgets, and
its BD-rate against the full model is reported with Table III's sign (> 0: the variant needs more bits).

Compression pipelines (compress.py's options): every combination of a --bits entry (N, or N/G: the
network at N bits, the grids at G) and a --prune fraction is a curve whose points are the budgets
times the --lambda values; the first combination (default: 8 bits, no pruning, the paper's) is the
anchor, the curve "TeNeRV" that the codecs and the ablation variants are compared with, and every
other pipeline's BD-rate against it is reported (< 0: fewer bits).

    python rd.py --frames clip/ --params 0.3M --bits 8,7,6,6/5,5 --lambda 0,0.01,0.1 --prune 0,0.15 --codecs x265

Writes OUT/rd.csv (codec, setting, bytes, bpp, psnr_rgb, psnr_yuv, psnr_y, msssim), OUT/rd.png and
OUT/bd.json. ffmpeg is optional: the one on PATH, else the one in the imageio-ffmpeg package;
without either, rd.py says so and reports TeNeRV alone.
"""
import argparse
import csv
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace

import numpy as np
import torch

import compress
import tenerv

# name: (ffmpeg encoder, its options, raw elementary-stream format, SEI NAL unit types, rate flag)
CODECS = {
    "x264": ("libx264", ["-preset", "veryslow"], "h264", "6", "-crf"),
    "x265": ("libx265", ["-preset", "veryslow", "-x265-params", "info=0:log-level=error"], "hevc", "39|40", "-crf"),
    "x265-noB": ("libx265", ["-preset", "veryslow", "-x265-params", "info=0:log-level=error:bframes=0"],
                 "hevc", "39|40", "-crf"),
    # not in the paper: vvenc's "medium" preset (its slower ones take many times longer)
    "vvc": ("libvvenc", ["-preset", "medium"], "vvc", "23|24", "-qp"),
}
KR, KB = tenerv.MATRICES[709]  # BT.709; tenerv.yuv420_to_rgb is the inverse


# -----------------------------------------------------------------------------
# Colour and quality

def rgb_to_yuv(rgb, chroma="420"):
    """uint8 RGB (T, 3, H, W) -> uint8 planes Y (T, H, W), U, V (T, H/2, W/2 for 4:2:0), BT.709 limited range."""
    x = rgb.astype(np.float64) / 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = KR * r + (1 - KR - KB) * g + KB * b
    u, v = (b - y) / (2 * (1 - KB)), (r - y) / (2 * (1 - KR))
    if chroma == "420":
        T, H, W = y.shape
        u = u.reshape(T, H // 2, 2, W // 2, 2).mean((2, 4))
        v = v.reshape(T, H // 2, 2, W // 2, 2).mean((2, 4))
    q = lambda a, lo, scale: np.clip(np.round(lo + scale * a), 0, 255).astype(np.uint8)  # noqa: E731
    return q(y, 16, 219), q(u, 128, 224), q(v, 128, 224)


def psnr_np(a, b):
    """Per-frame PSNR (T,) of uint8 arrays (T, ...)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255 ** 2 / np.maximum(mse, 1e-10))


def scores(ref_rgb, ref_yuv, rgb, yuv):
    """Quality of one decoded video (uint8 RGB and its planes) against the original."""
    py, pu, pv = (psnr_np(a, b) for a, b in zip(ref_yuv, yuv))
    x, y = torch.from_numpy(rgb).float() / 255, torch.from_numpy(ref_rgb).float() / 255
    ms = tenerv.quality(x, y)[1]
    return dict(psnr_rgb=float(psnr_np(rgb, ref_rgb).mean()), psnr_yuv=float(((6 * py + pu + pv) / 8).mean()),
                psnr_y=float(py.mean()), msssim=ms)


# -----------------------------------------------------------------------------
# Bjontegaard delta rate and PSNR

def _fit_integral(x, y, lo, hi):
    deg = min(3, len(x) - 1)
    c = np.polyint(np.polyfit(x, y, deg))
    return (np.polyval(c, hi) - np.polyval(c, lo)) / (hi - lo)


def bd_rate(rate_a, psnr_a, rate_b, psnr_b):
    """Average rate change (%) of curve b against anchor a at equal PSNR; None without a common range."""
    lo, hi = max(min(psnr_a), min(psnr_b)), min(max(psnr_a), max(psnr_b))
    if len(rate_a) < 2 or len(rate_b) < 2 or hi <= lo:
        return None
    d = _fit_integral(psnr_b, np.log(rate_b), lo, hi) - _fit_integral(psnr_a, np.log(rate_a), lo, hi)
    return float((np.exp(d) - 1) * 100)


def bd_psnr(rate_a, psnr_a, rate_b, psnr_b):
    """Average PSNR change (dB) of curve b against anchor a at equal rate; None without a common range."""
    la, lb = np.log(rate_a), np.log(rate_b)
    lo, hi = max(la.min(), lb.min()), min(la.max(), lb.max())
    if len(rate_a) < 2 or len(rate_b) < 2 or hi <= lo:
        return None
    return float(_fit_integral(lb, psnr_b, lo, hi) - _fit_integral(la, psnr_a, lo, hi))


# -----------------------------------------------------------------------------
# ffmpeg

def find_ffmpeg(path=None):
    """(ffmpeg executable, set of its encoders), or (None, why not)."""
    candidates = [path] if path else [shutil.which("ffmpeg")]
    if not path:
        try:
            import imageio_ffmpeg
            candidates.append(imageio_ffmpeg.get_ffmpeg_exe())
        except Exception:  # not installed, or the package has no binary for this platform
            pass
    found = []
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found.append((exe, {line.split()[1] for line in out.splitlines() if line.startswith(" V")}))
    if not found:
        why = (f"--ffmpeg {path}: cannot run it" if path else
               "ffmpeg not found (not on PATH, and no imageio-ffmpeg package: pip install imageio-ffmpeg)")
        return None, why
    wanted = {c[0] for c in CODECS.values()}
    return max(found, key=lambda f: len(wanted & f[1]))  # the build with the most of our encoders


def ffmpeg(exe, *args):
    r = subprocess.run([exe, "-hide_banner", "-loglevel", "error", "-y", *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"ffmpeg failed ({last})")


def code_with(exe, codec, setting, planes, size, chroma, work):
    """Encode the planes with one codec at one CRF/QP; returns (bytes of the stripped stream, decoded planes)."""
    encoder, options, fmt, sei, rate_flag = CODECS[codec]
    W, H = size
    T = len(planes[0])
    pix_fmt = "yuv420p" if chroma == "420" else "yuv444p"
    src, es, stripped, dec = (os.path.join(work, n) for n in ("in.yuv", "full.es", "stripped.es", "out.yuv"))
    if not os.path.exists(src):
        with open(src, "wb") as f:
            for t in range(T):
                for p in planes:
                    f.write(p[t].tobytes())
    ffmpeg(exe, "-f", "rawvideo", "-pix_fmt", pix_fmt, "-s", f"{W}x{H}", "-r", "25", "-i", src,
           "-c:v", encoder, *options, rate_flag, str(setting), "-f", fmt, es)
    ffmpeg(exe, "-f", fmt, "-i", es, "-c", "copy", "-bsf:v", f"filter_units=remove_types={sei}", "-f", fmt, stripped)
    ffmpeg(exe, "-f", fmt, "-i", stripped, "-f", "rawvideo", "-pix_fmt", pix_fmt, dec)
    raw = np.fromfile(dec, np.uint8)
    cw, ch = (W // 2, H // 2) if chroma == "420" else (W, H)
    frame = W * H + 2 * cw * ch
    if raw.size != T * frame:
        raise RuntimeError(f"decoded {raw.size / frame:g} frames, expected {T}")
    raw = raw.reshape(T, frame)
    out = (raw[:, :W * H].reshape(T, H, W), raw[:, W * H:W * H + cw * ch].reshape(T, ch, cw),
           raw[:, W * H + cw * ch:].reshape(T, ch, cw))
    return os.path.getsize(stripped), out


# -----------------------------------------------------------------------------
# TeNeRV points

DEFAULT = compress.CompressConfig()  # the paper's compression: 8-bit QAT, no pruning, no rate term


def curve_name(ablation="", pipeline=""):
    """The curve of the full model with the anchor pipeline (the first of --bits and --prune; by
    default the paper's 8 bits) is "TeNeRV", a variant's "TeNeRV V1" etc. (Table III),
    another pipeline's e.g. "TeNeRV 6-bit, 15% pruned" (λ varies along a curve, so it is not in the name)."""
    return " ".join(["TeNeRV"] + ([ablation] if ablation else []) + ([pipeline] if pipeline else []))


def pipeline_name(cc, anchor):
    """'' for the anchor pipeline, else its compress.pipeline_text without λ."""
    same = replace(cc, lmbda=0) == replace(anchor, lmbda=0)
    return "" if same else compress.pipeline_text(replace(cc, lmbda=0))


def file_suffix(cc):
    """How a run's .tnrv file is named for a pipeline: the fields that differ from the paper's
    compression, e.g. "" (the paper's), "_l0.01", "_6bit_g5_p0.15_pe5_l0.01"."""
    return ((f"_{cc.bits}bit" if cc.bits != DEFAULT.bits else "") + (f"_g{cc.bits_grids}" if cc.bits_grids else "")
            + (f"_p{cc.prune:g}" if cc.prune else "") + (f"_pe{cc.prune_epochs}" if cc.prune_epochs else "")
            + (f"_l{cc.lmbda:g}" if cc.lmbda else ""))


def planned_run(frames, budget, args, ablation=""):
    """(config, run folder, finished?) of one budget (and variant): a finished run with the same
    configuration, frames, size and matrix is reused."""
    T, _, H, W = frames.shape
    cfg = tenerv.size_model(tenerv.TeNeRVConfig(n_frames=T, height=H, width=W, params=tenerv.parse_params(budget),
                                                epochs=args.epochs, ablation=ablation))
    run = os.path.join(args.out, f"tenerv_{ablation + '_' if ablation else ''}{budget}")
    meta = os.path.join(run, "metrics.json")
    if not os.path.exists(meta):
        return cfg, run, False
    m = json.loads(pathlib.Path(meta).read_text())
    return cfg, run, (m.get("config") == json.loads(json.dumps(asdict(cfg))) and m.get("frames") == os.path.abspath(args.frames)
                      and m.get("size") == args.size and m.get("matrix") == yuv_matrix(args))


def yuv_matrix(args):
    """The colour matrix the frames were read with, for a .yuv/.y4m file (None for images)."""
    return args.matrix if os.path.isfile(args.frames) else None


def train_run(frames, plan, args, device):
    """Train the run of one budget (and variant) unless a finished one is there."""
    cfg, run, done = plan
    if done:
        print(f"{run}: reusing the finished run")
    else:
        print(f"{run}: training for {tenerv.plural(cfg.epochs, 'epoch')}")
        tenerv.fit(cfg, frames, run, device, frames_path=args.frames, size=args.size, matrix=yuv_matrix(args))


def tenerv_file(plan, cc, args):
    """Compress a finished run with one pipeline (or reuse its file: newer than the run, same QAT
    epochs and settings); returns the .tnrv path."""
    _, run, _ = plan
    path, report = run + file_suffix(cc) + ".tnrv", run + file_suffix(cc) + ".json"
    fresh = (os.path.exists(path) and os.path.exists(report)
             and os.path.getmtime(path) > os.path.getmtime(os.path.join(run, "metrics.json")))
    if fresh:
        saved = json.loads(pathlib.Path(report).read_text())
        fresh = saved.get("qat_epochs") == args.qat_epochs and all(saved.get(k, getattr(DEFAULT, k)) == v
                                                                 for k, v in asdict(cc).items())
    if fresh:
        print(f"{path}: reusing the compressed file")
    else:
        print(f"{path}: compressing ({compress.pipeline_text(cc)}, {tenerv.plural(args.qat_epochs, 'QAT epoch')})")
        compress.encode_run(run, path, args.qat_epochs, frames_path=args.frames, size=args.size, log=lambda s: None,
                            matrix=args.matrix, cc=cc)
    return path


def decoded_tenerv(path, shape):
    model, recon, _ = compress.decode_file(path)
    if tuple(recon.shape) != tuple(shape):
        raise ValueError(f"{path}: decodes to {compress.video_text(recon.shape)}, but --frames has {compress.video_text(shape)}")
    return (recon.numpy() * 255).round().astype(np.uint8), f"{tenerv.count_params(model.cfg)} params"


# -----------------------------------------------------------------------------
# The whole evaluation

def evaluate(args):
    tenerv.check_writable(args.out, "--out", folder=True)
    frames = tenerv.load_frames(args.frames, args.size, args.matrix)
    T, _, H, W = frames.shape
    if args.chroma == "420" and (H % 2 or W % 2):
        raise ValueError(f"{args.frames}: {W}x{H} has an odd side, which 4:2:0 cannot hold; use --chroma 444")
    budgets = [b for b in args.params.split(",") if b] if args.params else []
    for b in budgets:
        tenerv.parse_params(b)  # a bad budget fails now, not after hours of training
    variants = [v for v in args.ablation.split(",") if v]
    for v in variants:
        if v not in tenerv.ABLATIONS:
            raise ValueError(f"--ablation {v!r}: unknown; choose from {', '.join(tenerv.ABLATIONS)}")
    if variants and len(budgets) < 2:
        raise ValueError("--ablation needs 2 or more --params budgets: a BD-rate compares two rate-distortion curves")
    tnrv = [p for p in args.tnrv.split(",") if p] if args.tnrv else []
    if not budgets and not tnrv:
        raise ValueError("nothing to evaluate for TeNeRV: pass --params (budgets to train) and/or --tnrv (files)")
    codecs = [c for c in args.codecs.split(",") if c]
    for c in codecs:
        if c not in CODECS:
            raise ValueError(f"--codecs {c!r}: unknown; choose from {', '.join(CODECS)}")
    try:
        settings = [int(s) for s in args.crf.split(",") if s]
    except ValueError:
        raise ValueError(f"--crf {args.crf!r}: expected integers separated by commas, e.g. 22,27,32,37") from None
    pipelines = [compress.CompressConfig(bits=b, bits_grids=g, prune=p, prune_epochs=args.prune_epochs if p else 0)
                 for b, g in bits_list(args.bits) for p in number_list(args.prune, "--prune", float)]
    lambdas = number_list(args.lmbda, "--lambda", float)
    for cc in pipelines:
        compress.check_config(replace(cc, lmbda=min(lambdas)))
    plans = [(v, planned_run(frames, b, args, v)) for v in [""] + variants for b in budgets]
    # every pipeline at every λ for the full model; the variants with the first pipeline (the anchor)
    files = [(v, plan, replace(cc, lmbda=lam)) for v, plan in plans for cc in (pipelines[:1] if v else pipelines) for lam in lambdas]
    todo = [run for _, (_, run, done) in plans if not done]
    if todo:  # this can take hours: say so before it starts
        print(f"rd.py will train {tenerv.plural(len(todo), 'run')} of {tenerv.plural(args.epochs, 'epoch')} each "
              f"({', '.join(todo)}), then compress {tenerv.plural(len(files), 'file')} with {args.qat_epochs} QAT epochs "
              f"each; every run prints its time after its first epoch, and a rerun of this command reuses the finished ones")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    ref = frames.numpy()
    ref_yuv = rgb_to_yuv(ref, args.chroma)
    rows = []

    def add(codec, setting, n_bytes, rgb, yuv):
        row = dict(codec=codec, setting=setting, bytes=n_bytes, bpp=8 * n_bytes / (T * H * W),
                   **scores(ref, ref_yuv, rgb, yuv))
        rows.append(row)
        print(f"{codec:9s} {str(setting):>16s}  {row['bpp']:.4f} bpp  RGB {row['psnr_rgb']:.2f} dB  "
              f"YUV {row['psnr_yuv']:.2f} dB  MS-SSIM {row['msssim']:.4f}")

    for _, plan in plans:
        train_run(frames, plan, args, device)
    points = [(curve_name(v, pipeline_name(cc, pipelines[0])), tenerv_file(plan, cc, args), cc.lmbda) for v, plan, cc in files]
    for curve, path, lam in points + [("TeNeRV", p, 0) for p in tnrv]:
        rgb, setting = decoded_tenerv(path, frames.shape)
        add(curve, setting + (f", λ {lam:g}" if lam else ""), os.path.getsize(path), rgb, rgb_to_yuv(rgb, args.chroma))

    skipped = {}
    exe, encoders = find_ffmpeg(args.ffmpeg)
    if exe is None:
        print(f"{encoders}: reporting TeNeRV only")
        skipped = {c: encoders for c in codecs}
    else:
        print(f"ffmpeg: {exe}")
    for codec in codecs if exe else []:
        if CODECS[codec][0] not in encoders:
            skipped[codec] = f"{CODECS[codec][0]} is not in this ffmpeg build"
        elif codec == "vvc" and args.chroma == "444":
            skipped[codec] = "libvvenc codes 4:2:0 only"
        if codec in skipped:
            print(f"{codec}: skipped, {skipped[codec]}")
            continue
        with tempfile.TemporaryDirectory() as work:
            for s in settings:
                try:
                    n_bytes, yuv = code_with(exe, codec, s, ref_yuv, (W, H), args.chroma, work)
                except RuntimeError as e:
                    skipped[codec] = f"{'QP' if codec == 'vvc' else 'CRF'} {s}: {e}"
                    print(f"{codec}: stopped, {skipped[codec]}")
                    break
                rgb = tenerv.yuv420_to_rgb(*yuv)
                add(codec, f"{'qp' if codec == 'vvc' else 'crf'} {s}", n_bytes, rgb, yuv)

    bd = bd_table(rows)
    bd["skipped"], bd["chroma"], bd["frames"] = skipped, args.chroma, f"{T} x {W}x{H} from {args.frames}"
    bd["anchor"] = compress.pipeline_text(replace(pipelines[0], lmbda=0))  # what "TeNeRV" is
    write_csv(rows, os.path.join(args.out, "rd.csv"))
    tenerv.write_json_atomic(bd, os.path.join(args.out, "bd.json"))
    plot(rows, os.path.join(args.out, "rd.png"), f"{T} frames {W}x{H}, codecs in {args.chroma[0]}:{args.chroma[1]}:{args.chroma[2]}")
    f = lambda v, unit: "n/a" if v is None else f"{v:+.1f}{unit}"  # noqa: E731
    for codec, d in bd["vs"].items():
        print(f"TeNeRV vs {codec}: BD-rate {f(d['bd_rate_rgb'], '%')} (RGB), {f(d['bd_rate_yuv'], '%')} (YUV); "
              f"BD-PSNR {f(d['bd_psnr_rgb'], ' dB')} (RGB), {f(d['bd_psnr_yuv'], ' dB')} (YUV)")
    for v, d in bd["ablation"].items():
        print(f"{curve_name(v)} vs TeNeRV (Table III): BD-rate {f(d['bd_rate_rgb'], '%')} (RGB), "
              f"{f(d['bd_rate_yuv'], '%')} (YUV); > 0: the variant needs more bits for the same PSNR")
    for name, d in bd["pipelines"].items():
        print(f"{name} vs TeNeRV ({bd['anchor']}): BD-rate {f(d['bd_rate_rgb'], '%')} (RGB), {f(d['bd_rate_yuv'], '%')} (YUV); "
              f"BD-PSNR {f(d['bd_psnr_rgb'], ' dB')} (RGB); < 0: the pipeline needs fewer bits for the same PSNR")
    print("(n/a: a BD figure needs 2+ points on both curves and a PSNR/rate range they share)")
    print(f"wrote {args.out}/rd.csv, rd.png, bd.json")
    return rows, bd


def bd_table(rows):
    """BD figures of TeNeRV against each codec ("vs": < 0, TeNeRV needs fewer bits), of each variant
    against TeNeRV ("ablation", Table III's sign: > 0, the variant needs more bits), and of each other
    compression pipeline against TeNeRV, the anchor pipeline ("pipelines": < 0, the pipeline needs fewer bits)."""
    curve = lambda c, key: tuple(np.array([r[k] for r in rows if r["codec"] == c]) for k in ("bpp", key))  # noqa: E731

    def versus(anchor, test):
        d = {}
        for space in ("rgb", "yuv"):
            a, b = curve(anchor, f"psnr_{space}"), curve(test, f"psnr_{space}")
            d[f"bd_rate_{space}"] = bd_rate(a[0], a[1], b[0], b[1]) if len(a[0]) and len(b[0]) else None
            d[f"bd_psnr_{space}"] = bd_psnr(a[0], a[1], b[0], b[1]) if len(a[0]) and len(b[0]) else None
        return d

    names = list(dict.fromkeys(r["codec"] for r in rows))
    variants = [n for n in names if len(n.split()) == 2 and n.split()[1] in tenerv.ABLATIONS]
    pipelines = [n for n in names if n.startswith("TeNeRV ") and n not in variants]
    return {"vs": {c: versus(c, "TeNeRV") for c in names if not c.startswith("TeNeRV")},
            "ablation": {v.split()[1]: versus("TeNeRV", v) for v in variants},
            "pipelines": {p: versus("TeNeRV", p) for p in pipelines}}


def bits_list(text):
    """'8,6,6/5' -> [(8, 0), (6, 0), (6, 5)]: bits, and bits of the grids (0: the same)."""
    try:
        pairs = [tuple(int(n) for n in s.split("/")) for s in text.split(",") if s.strip()]
        if pairs and all(len(p) in (1, 2) for p in pairs):
            return [(p[0], p[1] if len(p) == 2 else 0) for p in pairs]
    except ValueError:
        pass
    raise ValueError(f"--bits {text!r}: expected bit depths separated by commas, each N or N/G (grids at G), e.g. 8,6,6/5")


def number_list(text, flag, kind):
    """'8,6' -> [8, 6], with a one-line error naming the flag."""
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag} {text!r}: expected {'integers' if kind is int else 'numbers'} separated by commas, e.g. "
                         f"{'8,6' if kind is int else '0,0.01'}")
    return values


def write_csv(rows, path):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["codec", "setting", "bytes", "bpp", "psnr_rgb", "psnr_yuv", "psnr_y", "msssim"])
    w.writeheader()
    w.writerows(rows)
    compress.write_bytes_atomic(buf.getvalue().encode(), path)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for codec in dict.fromkeys(r["codec"] for r in rows):
        rs = sorted((r for r in rows if r["codec"] == codec), key=lambda r: r["bpp"])
        variant = len(codec.split()) == 2 and codec.split()[1] in tenerv.ABLATIONS
        style = dict(marker="o", lw=2.5 if codec == "TeNeRV" else 1.2, label=codec,  # Table III's variants dashed,
                     ls="--" if variant else ":" if codec.startswith("TeNeRV ") else "-")  # other pipelines dotted
        for ax, key in zip(axes, ("psnr_rgb", "psnr_yuv", "msssim")):
            ax.plot([r["bpp"] for r in rs], [r[key] for r in rs], **style)
    for ax, label in zip(axes, ("PSNR RGB (dB)", "PSNR YUV 6:1:1 (dB)", "MS-SSIM (RGB)")):
        ax.set_xscale("log")
        log_ticks(ax)
        ax.set_xlabel("bpp")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    compress.write_bytes_atomic(buf.getvalue(), path)


def log_ticks(ax):
    """Log-scale bpp ticks as plain decimals, as many as fit: matplotlib's own (2x10^-1, 3x10^-1, ...
    within a decade) overlapped."""
    lo, hi = ax.get_xlim()
    decades = math.log10(hi / lo)
    subs = (1,) if decades > 3 else (1, 2, 5) if decades > 0.8 else (1, 1.5, 2, 3, 4, 5, 6, 8)
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in subs]
    ticks = [t for t in ticks if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlim(lo, hi)


def main(argv=None):
    p = argparse.ArgumentParser(description="Rate-distortion of TeNeRV against x264, x265 and VVC on your frames.")
    p.add_argument("--frames", required=True, help="folder of PNG/JPEG frames, a raw 8-bit YUV 4:2:0 .yuv file or a .y4m file")
    p.add_argument("--size", default=None, help="WxH of a .yuv file, pixels (default: a _WxH in its name)")
    p.add_argument("--matrix", type=int, default=tenerv.DEFAULT_MATRIX, choices=tuple(tenerv.MATRICES),
                   help="colour matrix of a .yuv/.y4m file: BT.601 or BT.709 (default: %(default)s)")
    p.add_argument("--params", default="", help="TeNeRV budgets to train and compress, e.g. 0.1M,0.2M,0.4M,0.8M")
    p.add_argument("--epochs", type=int, default=tenerv.TeNeRVConfig.epochs, help="training epochs per budget (default: %(default)s)")
    p.add_argument("--qat-epochs", type=int, default=compress.QAT_EPOCHS, help="QAT epochs per budget (default: %(default)s)")
    p.add_argument("--ablation", default="", help="also train and compress these variants of Table III at every budget, "
                   "e.g. V1,V2,V3,V4,V5, and give their BD-rate against the full model")
    p.add_argument("--bits", default=str(DEFAULT.bits), help="compress.py --bits of each pipeline, comma-separated, e.g. "
                   "8,7,6,5; N/G: the network at N bits, the grids at G (--bits-grids), e.g. 6/5; the first, with the "
                   "first --prune, is the anchor (default: %(default)s)")
    p.add_argument("--prune", default=f"{DEFAULT.prune:g}", help="compress.py --prune fractions, comma-separated, e.g. 0,0.15 "
                   "(default: %(default)s)")
    p.add_argument("--prune-epochs", type=int, default=DEFAULT.prune_epochs,
                   help="compress.py --prune-epochs of the pruned pipelines (default: %(default)s)")
    p.add_argument("--lambda", dest="lmbda", default=f"{DEFAULT.lmbda:g}", help="compress.py --lambda values, comma-separated: "
                   "the points of every pipeline's curve with the budgets, e.g. 0,0.01,0.05 (default: %(default)s)")
    p.add_argument("--tnrv", default="", help="existing .tnrv files of these frames to score, comma-separated")
    p.add_argument("--codecs", default=",".join(CODECS), help=f"any of {', '.join(CODECS)} (default: %(default)s)")
    p.add_argument("--crf", default="22,27,32,37,42,47", help="CRF of x264/x265 and QP of VVC, comma-separated (default: %(default)s)")
    p.add_argument("--chroma", default="420", choices=("420", "444"), help="chroma format the codecs get (default: %(default)s)")
    p.add_argument("--ffmpeg", default=None, help="ffmpeg executable (default: PATH, then imageio-ffmpeg's)")
    p.add_argument("--out", default=None, help="folder for runs, rd.csv, rd.png, bd.json (default: runs/rd_<frames>)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu"), help="where TeNeRV trains (default: %(default)s)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", "rd_" + os.path.basename(os.path.normpath(args.frames)).split(".")[0])
    try:
        if args.epochs < 1 or args.qat_epochs < 0:
            raise ValueError(f"--epochs {args.epochs} --qat-epochs {args.qat_epochs}: need at least 1 epoch and 0 or more QAT epochs")
        return evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line, no traceback
        print(f"{e.args[0] if e.args else 'interrupted'}; run the same command again to go on: the finished runs and "
              f"files in {args.out} are reused (an unfinished run starts over)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
