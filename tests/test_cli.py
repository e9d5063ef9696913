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


# --- 2. defaults and durations ----------------------------------------------------------------------

def test_durations_read_as_clock_times():
    assert tenerv.hms(0.4) == "0:00" and tenerv.hms(12.3) == "0:12" and tenerv.hms(754) == "12:34"
    assert tenerv.hms(3690) == "1:01:30" and tenerv.hms(36000) == "10:00:00"
    assert tenerv.plural(1, "GoP") == "1 GoP" and tenerv.plural(2, "frame") == "2 frames"


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
