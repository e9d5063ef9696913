"""Tests for the command lines as a user meets them: refusing to overwrite a run, Ctrl-C, colour
matrices and .y4m input, output paths checked before any training, and the printed configuration."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import compress  # noqa: E402
import rd  # noqa: E402
import tenerv  # noqa: E402
from test_tenerv import sample_frames, write_frames  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--params", "8K", "--epochs", "2"]  # 4 frames of 64x36: a run takes about a second


def one_line_error(main, argv):
    """The message of a command that must stop with one 'error: ...' line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """4 real frames of 64x36 and a finished 2-epoch run on them."""
    tmp = tmp_path_factory.mktemp("cli")
    folder = write_frames(str(tmp / "clip"), sample_frames(4, size=(64, 36)).permute(0, 2, 3, 1).numpy())
    tenerv.main(["--frames", folder, *TINY, "--out", str(tmp / "run")])
    return folder, str(tmp / "run"), tmp


def env():
    return dict(os.environ, OMP_NUM_THREADS="1")


# --- 1. a run is never overwritten by accident ------------------------------------------------------

def test_refuses_to_overwrite_a_run_and_force_overwrites(clip, tmp_path):
    folder, _, _ = clip
    out = str(tmp_path / "run")
    tenerv.main(["--frames", folder, *TINY, "--out", out])
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    msg = one_line_error(tenerv.main, ["--frames", folder, "--params", "8K", "--epochs", "3", "--out", out])
    assert "holds a finished run" in msg and "--resume" in msg and "new --out" in msg and "--force" in msg
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before
    os.remove(os.path.join(out, "metrics.json"))  # a started run (a checkpoint, no metrics) is refused too
    assert "holds a started run" in one_line_error(tenerv.main, ["--frames", folder, *TINY, "--out", out])
    tenerv.main(["--frames", folder, "--params", "8K", "--epochs", "3", "--out", out, "--force"])
    assert json.load(open(os.path.join(out, "metrics.json")))["epochs"] == 3
    # --dry-run writes nothing, so it may name a finished run's folder
    tenerv.main(["--frames", folder, *TINY, "--out", out, "--dry-run"])


def test_failed_resume_leaves_no_folder(clip, tmp_path):
    folder, _, _ = clip
    out = tmp_path / "never"
    assert "no checkpoint to resume" in one_line_error(tenerv.main, ["--frames", folder, *TINY, "--out", str(out), "--resume"])
    assert not out.exists()


def test_rd_reuses_its_finished_runs(clip, tmp_path, capsys):
    folder, _, _ = clip
    argv = ["--frames", folder, "--params", "8K", "--epochs", "2", "--qat-epochs", "0", "--codecs", "",
            "--out", str(tmp_path / "rd")]
    rd.main(argv)
    first = capsys.readouterr().out
    assert "rd.py will train 1 run of 2 epochs each" in first and "training for 2 epochs" in first
    rd.main(argv)
    again = capsys.readouterr().out
    assert "reusing the finished run" in again and "reusing the compressed file" in again and "will train" not in again


# --- 2. defaults and durations ----------------------------------------------------------------------

def test_help_shows_defaults(capsys):
    for main, argv, expect in ((tenerv.main, [], ["(default: 300)", "(default: 0.3M)", "(default: 709)", "(default: full)"]),
                               (compress.main, ["encode"], ["(default: 30", "(default: auto)"]),
                               (compress.main, ["decode"], ["(default: 709)"]),
                               (compress.main, ["bench"], ["(default: 5)"]),
                               (rd.main, [], ["(default: 300)", "(default: 30)", "(default: 22,27,32,37,42,47)"])):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert e.value.code == 0 and all(x in text for x in expect), (argv, text)
    d = tenerv.TeNeRVConfig()
    assert f"(default: {d.epochs})" in " ".join(tenerv.make_parser().format_help().split())
    assert "{full,V1,V2,V3,V4,V5}" in tenerv.make_parser().format_help()  # no empty choice


def test_durations_read_as_clock_times():
    assert tenerv.hms(0.4) == "0:00" and tenerv.hms(12.3) == "0:12" and tenerv.hms(754) == "12:34"
    assert tenerv.hms(3690) == "1:01:30" and tenerv.hms(36000) == "10:00:00"
    assert tenerv.plural(1, "GoP") == "1 GoP" and tenerv.plural(2, "frame") == "2 frames"


# --- 3. Ctrl-C --------------------------------------------------------------------------------------

def default_sigint():
    """In the child: SIGINT as a terminal delivers it. A shell that starts pytest in the background
    (`pytest &` in a script) ignores SIGINT, the child would inherit that, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_and_the_printed_command_resumes(clip, tmp_path):
    folder, _, _ = clip
    out = str(tmp_path / "run")
    argv = ["--frames", folder, "--params", "8K", "--epochs", "60", "--out", out]
    p = subprocess.Popen([sys.executable, "tenerv.py", *argv], cwd=REPO, env=env(), text=True, preexec_fn=default_sigint,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in p.stdout:  # not a terminal: one line per epoch, flushed as it ends
        lines.append(line)
        if " took " in line:
            break
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=120)
    assert "epoch 1/60 took" in lines[-1] and "for the whole run" in lines[-1], lines
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted at epoch ") and "/60; continue with: python tenerv.py " in err, err
    done = int(err.split("interrupted at epoch ")[1].split("/")[0])
    assert 1 <= done < 60
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["state"]["epoch"] == done  # the last finished epoch, saved
    command = shlex.split(err.split("continue with: ")[1])
    assert command[2:] == argv + ["--resume"]  # the user's own arguments, --out included
    r = subprocess.run([sys.executable] + command[1:], cwd=REPO, env=env(), text=True, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} at epoch {done}/60" in r.stdout
    assert json.load(open(os.path.join(out, "metrics.json")))["epochs"] == 60


def test_ctrl_c_names_the_default_out_and_keeps_one_resume(monkeypatch, capsys, clip):
    folder, _, _ = clip

    def interrupted(args):
        args.out = args.out or "runs/x"
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "ckpt.pt"), "w").close()
        raise KeyboardInterrupt("interrupted at epoch 3/9")

    monkeypatch.chdir(clip[2])
    monkeypatch.setattr(tenerv, "run", interrupted)
    for argv, tail in ((["--frames", folder], ["--frames", folder, "--out", "runs/x", "--resume"]),
                       (["--frames", folder, "--resume", "--force"], ["--frames", folder, "--resume", "--out", "runs/x"])):
        with pytest.raises(SystemExit) as e:
            tenerv.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 130 and err.count("\n") == 1
        assert shlex.split(err.split("continue with: ")[1])[2:] == tail


def test_compress_encode_ctrl_c_writes_nothing(clip, tmp_path):
    _, run, _ = clip
    out = tmp_path / "clip.tnrv"
    p = subprocess.Popen([sys.executable, "compress.py", "encode", run, "-o", str(out), "--qat-epochs", "500"], cwd=REPO, preexec_fn=default_sigint,
                         env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:
        if "QAT" in line and " loss " in line:  # one line per QAT epoch, with its bits, rate, PSNR and ETA
            assert line.startswith("[") and "epoch 1/500 QAT" in line and " psnr " in line and "ETA " in line, line
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and "was not written" in err
    assert not out.exists() and not (tmp_path / "clip.json").exists() and os.listdir(tmp_path) == []


# --- 4. colour matrices and .y4m --------------------------------------------------------------------

def rgb_to_i420(rgb, matrix):
    """uint8 RGB (T, H, W, 3) -> limited-range planes with the given matrix; chroma of each 2x2 block's mean."""
    kr, kb = tenerv.MATRICES[matrix]
    x = rgb.astype(np.float64) / 255
    y = kr * x[..., 0] + (1 - kr - kb) * x[..., 1] + kb * x[..., 2]
    u, v = (x[..., 2] - y) / (2 * (1 - kb)), (x[..., 0] - y) / (2 * (1 - kr))
    T, H, W = y.shape
    sub = lambda a: a.reshape(T, H // 2, 2, W // 2, 2).mean((2, 4))  # noqa: E731
    q = lambda a, lo, s: np.clip(np.round(lo + s * a), 0, 255).astype(np.uint8)  # noqa: E731
    return q(y, 16, 219), q(sub(u), 128, 224), q(sub(v), 128, 224)


def blocky_rgb(T=3, H=32, W=48, seed=0):
    """Saturated colours, constant over 2x2 blocks (so 4:2:0 loses nothing): the matrix shows."""
    rgb = np.random.default_rng(seed).integers(20, 236, (T, H // 2, W // 2, 3)).astype(np.uint8)
    return rgb.repeat(2, axis=1).repeat(2, axis=2)


def write_yuv(path, planes):
    with open(path, "wb") as f:
        for t in range(len(planes[0])):
            f.write(b"".join(p[t].tobytes() for p in planes))
    return str(path)


def write_y4m(path, planes, header="C420jpeg", frame_line=b"FRAME\n"):
    H, W = planes[0].shape[1:]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{W} H{H} F25:1 Ip A1:1 {header}\n".encode())
        for t in range(len(planes[0])):
            f.write(frame_line + b"".join(p[t].tobytes() for p in planes))
    return str(path)


def test_a_601_file_read_as_601_matches_and_as_709_drifts(tmp_path):
    rgb = blocky_rgb()
    path = write_yuv(tmp_path / "clip_48x32.yuv", rgb_to_i420(rgb, 601))
    read = lambda m: tenerv.load_frames(path, matrix=m).permute(0, 2, 3, 1).numpy().astype(int)  # noqa: E731
    assert np.abs(read(601) - rgb).max() <= 2  # rounding only
    ref = torch.from_numpy(rgb).float() / 255
    psnr = lambda m: tenerv.psnr(torch.from_numpy(read(m)).float() / 255, ref).mean().item()  # noqa: E731
    assert psnr(601) > 50 and psnr(709) < 32  # the wrong matrix: every colour drifts (52 and 30 dB)


def test_y4m_round_trip_420_and_444(tmp_path):
    rgb = blocky_rgb()
    planes = rgb_to_i420(rgb, 709)
    yuv = tenerv.load_frames(write_yuv(tmp_path / "clip_48x32.yuv", planes))
    for header, line in (("C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED", b"FRAME\n"), ("C420mpeg2", b"FRAME Ip\n"), ("", b"FRAME\n")):
        y4m = tenerv.load_frames(write_y4m(tmp_path / "clip.y4m", planes, header, line))
        assert torch.equal(y4m, yuv), header
    assert np.abs(yuv.permute(0, 2, 3, 1).numpy().astype(int) - rgb).max() <= 2
    full = [p.repeat(2, axis=1).repeat(2, axis=2) if i else p for i, p in enumerate(planes)]  # 4:4:4
    assert torch.equal(tenerv.load_frames(write_y4m(tmp_path / "c444.y4m", full, "C444")), yuv)
    assert tenerv.load_frames(write_y4m(tmp_path / "c.y4m", planes), matrix=601).shape == (3, 3, 32, 48)


def test_bad_y4m_files_are_one_line_errors(tmp_path):
    planes = rgb_to_i420(blocky_rgb(T=2), 709)
    good = open(write_y4m(tmp_path / "good.y4m", planes), "rb").read()
    cases = [(("C420p10",), "10-bit"), (("C422",), "8-bit 4:2:0 or 4:4:4"), (("C420jpeg It",), "interlaced"),
             (("C420jpeg XCOLORRANGE=FULL",), "full range")]
    for (header,), expect in cases:
        path = write_y4m(tmp_path / "bad.y4m", planes, header)
        assert expect in one_line_error(tenerv.main, ["--frames", path])
    for name, data, expect in (("cut.y4m", good[:-10], "frame 1 is damaged or cut short"),
                               ("noframe.y4m", good.replace(b"FRAME", b"FRAMX", 1), "frame 0 is damaged"),
                               ("nohead.y4m", b"RIFF" + good[4:], "no YUV4MPEG2 header"),
                               ("empty.y4m", good[:good.index(b"FRAME")], "holds no frames")):
        (tmp_path / name).write_bytes(data)
        assert expect in one_line_error(tenerv.main, ["--frames", str(tmp_path / name)])
    assert "the .y4m header says 48x32" in one_line_error(tenerv.main, ["--frames", str(tmp_path / "good.y4m"), "--size", "64x32"])


def test_the_run_keeps_its_matrix_for_compress(tmp_path, monkeypatch):
    rgb = sample_frames(4, size=(64, 36)).permute(0, 2, 3, 1).numpy()
    path = write_yuv(tmp_path / "clip_64x36.yuv", rgb_to_i420(rgb, 601))
    run = str(tmp_path / "run")
    tenerv.main(["--frames", path, "--matrix", "601", *TINY, "--out", run])
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["matrix"] == 601 and metrics["size"] is None
    real, matrices = tenerv.load_frames, []
    monkeypatch.setattr(tenerv, "load_frames", lambda p, s=None, m=709: matrices.append(m) or real(p, s, m))
    report = compress.encode_run(run, str(tmp_path / "c.tnrv"), qat_epochs=0, log=lambda s: None)
    assert matrices == [601]  # compress.py reads the frames as the run did
    assert report["psnr_float"] == pytest.approx(metrics["psnr"], abs=1e-4)


@pytest.mark.skipif(rd.find_ffmpeg()[0] is None, reason="no ffmpeg (system or imageio-ffmpeg)")
def test_the_readme_ffmpeg_recipes(tmp_path):
    """README: PNGs -> BT.709 .yuv/.y4m with out_color_matrix=bt709; ffmpeg's plain recipe writes BT.601."""
    exe, _ = rd.find_ffmpeg()
    src = write_frames(str(tmp_path / "png"), sample_frames(4, size=(320, 180)).permute(0, 2, 3, 1).numpy())
    ref = tenerv.load_frames(src).float() / 255
    psnr = lambda path, m: tenerv.psnr(tenerv.load_frames(path, matrix=m).float() / 255, ref).mean().item()  # noqa: E731
    pngs = os.path.join(src, "%d.png")
    for name in ("clip_320x180.yuv", "clip.y4m"):  # measured: 40.0 dB read as 709 (34.2 as 601); plain: 40.5 as 601
        out = str(tmp_path / name)
        subprocess.run([exe, "-loglevel", "error", "-i", pngs, "-vf", "scale=out_color_matrix=bt709:out_range=tv",
                        "-pix_fmt", "yuv420p", out], check=True)
        assert psnr(out, 709) > 38 and psnr(out, 709) > psnr(out, 601) + 3, name
        out = str(tmp_path / ("plain_" + name))
        subprocess.run([exe, "-loglevel", "error", "-i", pngs, "-pix_fmt", "yuv420p", out], check=True)
        assert psnr(out, 601) > 38 and psnr(out, 601) > psnr(out, 709) + 3, name


# --- 5. output paths are checked before any work ----------------------------------------------------

def test_encode_to_a_missing_folder_fails_before_qat(clip, tmp_path, capsys):
    _, run, _ = clip
    t0 = time.time()
    msg = one_line_error(compress.main, ["encode", run, "-o", str(tmp_path / "nope" / "clip.tnrv"), "--qat-epochs", "100000"])
    assert "nope does not exist" in msg and time.time() - t0 < 30
    assert "QAT" not in capsys.readouterr().out  # not one QAT epoch ran
    assert "is a folder" in one_line_error(compress.main, ["encode", run, "-o", str(tmp_path), "--qat-epochs", "100000"])
    assert "--json" in one_line_error(compress.main, ["encode", run, "-o", str(tmp_path / "c.tnrv"), "--qat-epochs", "100000",
                                                      "--json", str(tmp_path / "nope" / "c.json")])
    assert os.listdir(tmp_path) == []


def test_out_folders_are_checked_first(clip, tmp_path):
    folder, _, _ = clip
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--out" in one_line_error(tenerv.main, ["--frames", folder, *TINY, "--out", str(a_file)])
    assert "cannot write in" in one_line_error(tenerv.main, ["--frames", folder, *TINY, "--out", str(a_file / "run")])
    assert "--out" in one_line_error(rd.main, ["--frames", folder, "--params", "8K", "--out", str(a_file)])
    assert "--out" in one_line_error(compress.main, ["decode", "x.tnrv", "--out", str(a_file)])
    assert a_file.read_text() == "x"


# --- 6. messages for people -------------------------------------------------------------------------

def test_bitstream_errors_name_things_in_words(clip, tmp_path):
    _, run, _ = clip
    model, ckpt = tenerv.load_checkpoint(os.path.join(run, "ckpt.pt"))
    data, _ = compress.encode_model(model, ckpt["state"]["boundaries"])
    with pytest.raises(compress.FormatError) as e:
        compress.decode_model(b"\x89PNG\r\n\x1a\n" + data[8:])
    assert "not a TeNeRV file: it starts with 89 50 4E 47 (a PNG image?), not TNRV" in str(e.value)
    bad = bytearray(data)
    bad[-1] ^= 1  # the last section's payload: its CRC fails
    with pytest.raises(compress.FormatError) as e:
        compress.decode_model(bytes(bad))
    assert "section SMAL fails its CRC32 check" in str(e.value) and "b'" not in str(e.value)
    assert compress.tag_name(b"BIG_") == "BIG_" and compress.tag_name(b"\x00\x01ab") == "00 01 61 62"


# --- 7. the printed configuration -------------------------------------------------------------------

@pytest.mark.parametrize("epochs, stage1, stage2", [(50, "5 epochs (1-5)", "45 epochs (6-50)"),
                                                    (5, "1 epoch (1)", "4 epochs (2-5)"),
                                                    (1, "1 epoch (1)", "0 epochs")])
def test_printed_config_says_what_the_run_does(clip, capsys, epochs, stage1, stage2):
    folder, _, _ = clip
    tenerv.main(["--frames", folder, "--params", "8K", "--epochs", str(epochs), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    cfg = tenerv.size_model(tenerv.TeNeRVConfig(n_frames=4, height=36, width=64, params=8000, epochs=epochs))
    assert tenerv.stage1_epochs(cfg) == min(epochs, int(stage1.split()[0]))
    assert any(l.startswith(f"stage 1: {stage1}, ") for l in lines), lines
    assert any(l.startswith(f"stage 2: {stage2}, ") for l in lines), lines
    assert f"parameters: {tenerv.count_params(cfg)}" in lines  # on its own line, as users grep it
    assert lines[0] == f"video: 4 frames of 64x36 from {folder}"
    assert all(len(l) < 140 for l in lines)
    size = next(l for l in lines if l.startswith("size: "))
    parts = [int(w) for w in size.split("(--params")[0].split() if w.isdigit()]
    assert sum(parts) == tenerv.count_params(cfg)  # the split adds up
