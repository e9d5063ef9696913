"""Tests for the speed benchmark (tenerv.py --bench, bench.speed) and --compile: the figures it reports,
MACs per pixel against a count by hand, its flag checks, torch.compile against eager and the fallback."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench  # noqa: E402
import tenerv  # noqa: E402
from test_tenerv import cli_error, sample_frames, write_frames  # noqa: E402

# 64x36 frames, two GoPs, two frames per step: a benchmark takes about a second
TINY = ["--params", "8K", "--strides", "2,2", "--gops", "2", "--batch-size", "2", "--bench-steps", "1"]


def tiny_cfg(T=8, **kw):
    return tenerv.size_model(tenerv.TeNeRVConfig(n_frames=T, height=36, width=64, params=8000, strides=(2, 2),
                                                 gops=2, batch_size=2, **kw))


def macs_by_hand(cfg):
    """MACs per pixel of one frame's forward pass, layer by layer: the IFF sum (Eq. 2), per block a 1x1
    projection at its input resolution, then per unit a k x k depthwise conv and the two pointwise convs
    of the MLP; the 3x3 head. Computed on the padded grid, divided by the frame's pixels."""
    dims, grid = tenerv.block_dims(cfg), sum(cfg.grid_channels)
    hidden = [cfg.dim_hidden0] + [e * d for e, d in zip(cfg.expansions[1:], dims[1:])]
    h, w, c_in = cfg.base_h, cfg.base_w, grid
    macs = cfg.window * grid * h * w
    for i, (s, c) in enumerate(zip((1,) + tuple(cfg.strides), dims)):
        macs += h * w * c_in * c * s * s
        h, w, c_in = h * s, w * s, c
        macs += cfg.depths[i] * h * w * (cfg.kernel ** 2 * c + 2 * c * hidden[i])
    macs += h * w * 3 * 3 * c_in * 3
    return macs / (cfg.height * cfg.width)


def test_bench_on_frames_reports_and_writes_json(tmp_path, capsys):
    folder = write_frames(str(tmp_path / "clip"), sample_frames(4).permute(0, 2, 3, 1).numpy())
    out = str(tmp_path / "speed.json")
    tenerv.main(["--bench", "--frames", folder, *TINY, "--l1-epochs", "30", "--out", out])  # Sec. IV-A's L1 epochs
    printed = capsys.readouterr().out
    for line in ("stage 1: ", "stage 2 (2 GoPs): ", "both stages (30 + 270 of 300 epochs): ", "decode: ",
                 "peak memory: ", "MACs per pixel: ", "projected training (steps only, 64x36, cpu"):
        assert line in printed, line
    assert "elementwise ops not counted" in printed and "peak RSS of the process" in printed
    r = json.load(open(out))
    cfg = tenerv.config_from_dict(r["config"])
    assert (r["n_frames"], r["width"], r["height"], r["gops"], r["device"]) == (4, 64, 36, 2, "cpu")
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists("runs/clip_8K")  # no run folder
    s1, s2 = r["stage1"], r["stage2"]
    assert s1["l1_only"] and not s2["l1_only"] and s1["frames_per_step"] == s2["frames_per_step"] == 2
    assert s1["s_per_step"] > 0 and s2["s_per_epoch_per_100_frames"] == pytest.approx(s2["s_per_step"] * 50)
    assert r["s_per_epoch_per_100_frames"] == pytest.approx(0.1 * s1["s_per_epoch_per_100_frames"]
                                                            + 0.9 * s2["s_per_epoch_per_100_frames"])
    assert r["projected_s_paper"] == pytest.approx(600 * r["s_per_epoch_per_100_frames"] * 300 / 100)
    assert r["projected_s_clip"] == pytest.approx(4 * r["s_per_epoch_per_100_frames"] * 300 / 100)
    assert r["decode_fps"] > 0 and r["decode_frames"] == 4 and r["peak_memory_mb"] > 50
    assert r["macs_per_pixel"] == pytest.approx(macs_by_hand(cfg), rel=1e-9)
    assert not (s1["compiled"] or s2["compiled"] or r["decode_compiled"])
    # the file is not overwritten by accident
    assert "--out" in cli_error(["--bench", "--frames", folder, *TINY, "--out", out]) and "--force" in \
        cli_error(["--bench", "--frames", folder, *TINY, "--out", out])
    tenerv.main(["--bench", "--frames", folder, *TINY, "--out", out, "--force"])


def test_synthetic_sizes_the_model_for_all_frames(capsys):
    """600 frames of 1080p at 3M without data: the model is sized for T = 600 (K = 6 GoPs), MACs per pixel are
    counted on the meta device (no compute); --dry-run stops before any timing."""
    tenerv.main(["--bench", "--synthetic", "1920x1080x600", "--params", "3M", "--dry-run"])
    printed = capsys.readouterr().out
    assert "video: 600 frames of 1920x1080 from random frames (--synthetic)" in printed
    assert "GoPs: K = 6" in printed and "stage 1:" in printed and "s/step" not in printed
    cfg = tenerv.size_model(tenerv.TeNeRVConfig(n_frames=600, height=1080, width=1920, params=3_000_000))
    assert bench.macs_per_pixel(cfg) == pytest.approx(macs_by_hand(cfg), rel=1e-9)
    # a synthetic clip of 40 frames trains from a pool of 8 random frames, the model sized for 40
    r = bench.speed(tiny_cfg(T=40), None, torch.device("cpu"), steps=1, log=lambda s: None)
    assert r["n_frames"] == 40 and r["frames_on_device_mb"] == pytest.approx(40 * 3 * 64 * 36 / 2 ** 20)


def test_bench_flag_errors(tmp_path):
    folder = write_frames(str(tmp_path / "clip"), sample_frames(4).permute(0, 2, 3, 1).numpy())
    assert "expected WxHxT" in cli_error(["--bench", "--synthetic", "1920x1080"])
    assert "at least 16x16 px" in cli_error(["--bench", "--synthetic", "8x8x4"])
    assert "--frames DIR, or --synthetic WxHxT" in cli_error(["--bench"])
    assert "pass one of the two" in cli_error(["--bench", "--frames", folder, "--synthetic", "64x36x4"])
    assert "--bench --resume" in cli_error(["--bench", "--frames", folder, "--resume"])
    assert "--bench --save-frames" in cli_error(["--bench", "--frames", folder, "--save-frames"])
    assert "--compile: only with --bench" in cli_error(["--frames", folder, "--compile"])
    assert "--synthetic: random frames, only to benchmark" in cli_error(["--synthetic", "64x36x4"])
    assert "--bench-steps 0: must be at least 1" in cli_error(["--bench", "--frames", folder, "--bench-steps", "0"])
    assert "is a folder" in cli_error(["--bench", "--frames", folder, "--out", str(tmp_path)])
    assert "--frames: missing" in cli_error([])


def test_compile_falls_back_with_one_line(monkeypatch, capsys):
    """No C++ compiler, or an error while compiling, shows at the first call: one line, then eager."""
    def fails_at_first_call(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Compiler: cc is not found\n(the rest of a long message)")
        return call

    def unavailable(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    for compile, message in ((fails_at_first_call, "--compile: the stage-1 training step failed to compile "
                              "(RuntimeError: Compiler: cc is not found); running it eagerly"),
                             (unavailable, "--compile: torch.compile is unavailable (RuntimeError: torch.compile is "
                              "not supported on this Python); running the stage-1 training step eagerly")):
        monkeypatch.setattr(torch, "compile", compile)
        r = bench.speed(tiny_cfg(), None, torch.device("cpu"), compile=True, steps=1)
        printed = capsys.readouterr().out
        assert [line for line in printed.splitlines() if "--compile" in line] == [message]  # not again in stage 2
        assert r["compile"] and not (r["stage1"]["compiled"] or r["stage2"]["compiled"] or r["decode_compiled"])
        assert r["stage2"]["s_per_step"] > 0 and r["decode_fps"] > 0


def test_compile_matches_eager(capsys):
    """torch.compile (inductor: the system C++ compiler) gives eager's frames, before and after the stage
    switch (split_gops: a new model, compiled anew), on a batch mixing two GoPs. Slow for a test because of
    compiling: about 60 s on a busy 2-core VM with an empty inductor cache, 10-20 s with it warm."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = tenerv.TeNeRV(cfg).eval()
    t = torch.tensor([1, 6])  # frames of GoPs 1 and 2 after the split
    frames = {}
    with torch.no_grad():
        for stage in (1, 2):
            if stage == 2:
                model.split_gops(tenerv.equal_gops(cfg.n_frames, cfg.gops))
                for m in model.modules():  # GoP 2's kernels differ from GoP 1's, so a stale graph would show
                    if isinstance(m, tenerv.GoPDepthwiseConv):
                        m.weight[1] += 0.1
            fast = bench.fallback(bench.maybe_compile(model, True, print, "decoding"), model, print, "decoding")
            out, eager = fast(t), model(t)
            assert fast.compiled() and "--compile" not in capsys.readouterr().out
            assert torch.allclose(out, eager, atol=1e-5), (stage, (out - eager).abs().max())
            frames[stage] = eager
    assert torch.allclose(frames[1][0], frames[2][0], atol=1e-6)  # GoP 1 kept its kernels
    assert not torch.allclose(frames[1][1], frames[2][1], atol=1e-3)  # GoP 2 did not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda(tmp_path, capsys):
    """On a GPU: CUDA-synchronised timings, bf16 autocast and channels-last as in train(), peak memory from
    torch.cuda.max_memory_allocated, and --compile."""
    out = str(tmp_path / "speed.json")
    tenerv.main(["--bench", "--synthetic", "320x180x16", "--params", "0.1M", "--device", "cuda", "--compile",
                 "--bench-steps", "3", "--out", out])
    r = json.load(open(out))
    assert r["device"].startswith("cuda") and r["peak_memory_kind"] == "torch.cuda.max_memory_allocated"
    assert 0 < r["peak_memory_mb"] < torch.cuda.get_device_properties(0).total_memory / 2 ** 20
    assert r["stage1"]["compiled"] and r["stage2"]["compiled"] and r["decode_compiled"]
    assert r["stage2"]["s_per_step"] > 0 and r["decode_fps"] > 0
    assert "--compile:" not in capsys.readouterr().out
