"""Tests for rd.py: Bjontegaard deltas, colour conversion, the ffmpeg path and the no-ffmpeg path."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import compress  # noqa: E402
import rd  # noqa: E402
import tenerv  # noqa: E402
from test_tenerv import sample_frames, tiny_cfg, write_frames  # noqa: E402

RATES = np.array([0.05, 0.1, 0.2, 0.4])
PSNRS = np.array([28.0, 31.0, 33.5, 35.5])


def test_bd_rate_known_cases():
    assert rd.bd_rate(RATES, PSNRS, RATES, PSNRS) == pytest.approx(0, abs=1e-9)
    assert rd.bd_rate(RATES, PSNRS, 0.9 * RATES, PSNRS) == pytest.approx(-10, abs=1e-6)
    assert rd.bd_rate(RATES, PSNRS, 1.25 * RATES, PSNRS) == pytest.approx(25, abs=1e-6)
    assert rd.bd_psnr(RATES, PSNRS, RATES, PSNRS + 0.7) == pytest.approx(0.7, abs=1e-9)
    # a curve that is better everywhere has a negative BD-rate and a positive BD-PSNR
    assert rd.bd_rate(RATES, PSNRS, RATES, PSNRS + 1) < 0 < rd.bd_psnr(RATES, PSNRS, RATES, PSNRS + 1)
    # no PSNR range in common, or a single point: no number rather than an extrapolation
    assert rd.bd_rate(RATES, PSNRS, RATES, PSNRS + 20) is None
    assert rd.bd_rate(RATES, PSNRS, RATES[:1], PSNRS[:1]) is None


def test_yuv_conversion_roundtrip_and_weighting():
    rgb = sample_frames(2, size=(64, 36)).numpy()
    for chroma, shape in (("420", (2, 18, 32)), ("444", (2, 36, 64))):
        y, u, v = rd.rgb_to_yuv(rgb, chroma)
        assert y.shape == (2, 36, 64) and u.shape == v.shape == shape
        back = tenerv.yuv420_to_rgb(y, u, v)
        assert back.shape == rgb.shape
        assert rd.psnr_np(back, rgb).min() > (27 if chroma == "420" else 38)  # 444: 8-bit rounding only
    # the YUV PSNR is (6 Y + U + V) / 8, per frame, then averaged
    ref = rd.rgb_to_yuv(rgb)
    noisy = tuple(np.clip(p.astype(int) + d, 0, 255).astype(np.uint8) for p, d in zip(ref, (1, 2, 4)))
    s = rd.scores(rgb, ref, rgb, noisy)
    by_hand = (6 * 10 * np.log10(255 ** 2 / 1) + 10 * np.log10(255 ** 2 / 4) + 10 * np.log10(255 ** 2 / 16)) / 8
    assert s["psnr_yuv"] == pytest.approx(by_hand, abs=0.05)
    assert s["psnr_rgb"] > 100 and s["msssim"] == pytest.approx(1, abs=1e-5)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny trained and compressed model of 4 real frames, and the frames' folder."""
    tmp = tmp_path_factory.mktemp("rd")
    frames = sample_frames(4, size=(40, 24))
    folder = write_frames(str(tmp / "frames"), frames.permute(0, 2, 3, 1).numpy())
    cfg = tiny_cfg(n_frames=4, gops=1, min_gop=0, epochs=3)
    run = str(tmp / "run")
    tenerv.fit(cfg, frames, run, torch.device("cpu"), frames_path=folder, log=lambda s: None)
    path = str(tmp / "clip.tnrv")
    compress.encode_run(run, path, qat_epochs=1, log=lambda s: None)
    return folder, path, tmp


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_without_ffmpeg_reports_tenerv_alone(clip, monkeypatch, capsys):
    folder, path, tmp = clip
    monkeypatch.setattr(rd.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails: as if not installed
    out = str(tmp / "no_ffmpeg")
    rd.main(["--frames", folder, "--tnrv", path, "--out", out])
    assert "ffmpeg not found" in capsys.readouterr().out
    rows = read_csv(os.path.join(out, "rd.csv"))
    assert [r["codec"] for r in rows] == ["TeNeRV"]
    assert int(rows[0]["bytes"]) == os.path.getsize(path)  # the whole file, header included
    bd = json.load(open(os.path.join(out, "bd.json")))
    assert set(bd["skipped"]) == set(rd.CODECS) and os.path.getsize(os.path.join(out, "rd.png")) > 1000


def nal_types(data, codec):
    """NAL unit types of an Annex-B stream (3-byte start codes; 4-byte ones contain them)."""
    starts = [i + 3 for i in range(len(data) - 3) if data[i:i + 3] == b"\x00\x00\x01"]
    if codec == "x264":
        return {data[i] & 0x1F for i in starts}
    return {(data[i] >> 1) & 0x3F for i in starts}


@pytest.mark.skipif(rd.find_ffmpeg()[0] is None, reason="no ffmpeg (system or imageio-ffmpeg)")
def test_with_ffmpeg_streams_have_no_sei_and_quality_follows_crf(tmp_path):
    exe, encoders = rd.find_ffmpeg()
    rgb = sample_frames(4, size=(128, 72)).numpy()  # x265 needs frames larger than its 64x64 blocks
    planes = rd.rgb_to_yuv(rgb)
    for codec, sei in (("x264", {6}), ("x265", {39, 40})):
        if rd.CODECS[codec][0] not in encoders:
            continue
        results = []
        for crf in (18, 40):
            work = tmp_path / f"{codec}_{crf}"
            work.mkdir()
            n_bytes, yuv = rd.code_with(exe, codec, crf, planes, (128, 72), "420", str(work))
            stream = (work / "stripped.es").read_bytes()
            assert n_bytes == len(stream) and not nal_types(stream, codec) & sei
            if codec == "x264":  # x264 writes its version SEI (x265's is off: info=0), now gone
                assert len((work / "full.es").read_bytes()) > n_bytes + 300
            results.append((n_bytes, rd.scores(rgb, planes, tenerv.yuv420_to_rgb(*yuv), yuv)))
        (b_hi, s_hi), (b_lo, s_lo) = results
        assert b_hi > b_lo and s_hi["psnr_yuv"] > s_lo["psnr_yuv"] and s_hi["psnr_yuv"] > 35


def test_bad_arguments_are_one_line_errors(clip, tmp_path):
    folder, path, _ = clip
    for argv, msg in ((["--frames", folder], "nothing to evaluate"),
                      (["--frames", folder, "--tnrv", path, "--codecs", "x266"], "unknown"),
                      (["--frames", folder, "--tnrv", path, "--crf", "a,b"], "expected integers"),
                      (["--frames", folder, "--params", "lots"], "--params"),
                      (["--frames", folder, "--tnrv", str(tmp_path / "none.tnrv")], "no such file")):
        with pytest.raises(SystemExit) as e:
            rd.main(argv + ["--out", str(tmp_path / "o")])
        assert str(e.value.code).startswith("error: ") and msg in str(e.value.code) and "\n" not in str(e.value.code)


def test_ablation_bd_rate_sign_follows_table_iii():
    rows = [dict(codec=c, bpp=r, psnr_rgb=p, psnr_yuv=p + 3) for c, k in (("TeNeRV", 1.0), ("TeNeRV V1", 1.1))
            for r, p in zip(k * RATES, PSNRS)]
    ab = rd.bd_table(rows)["ablation"]
    assert list(ab) == ["V1"] and ab["V1"]["bd_rate_rgb"] == pytest.approx(10, abs=1e-6)  # V1 needs 10% more bits


def test_ablation_trains_compresses_and_compares_each_variant(clip, tmp_path, capsys):
    folder, _, _ = clip
    out = str(tmp_path / "abl")
    rows, bd = rd.main(["--frames", folder, "--params", "8K,16K", "--epochs", "2", "--qat-epochs", "0",
                        "--codecs", "", "--ablation", "V3", "--out", out])
    assert sorted(r["codec"] for r in rows) == ["TeNeRV"] * 2 + ["TeNeRV V3"] * 2
    assert os.path.exists(os.path.join(out, "tenerv_V3_8K.tnrv")) and os.path.exists(os.path.join(out, "tenerv_16K.tnrv"))
    runs = {json.load(open(os.path.join(out, f"tenerv_{n}", "metrics.json")))["config"]["ablation"] for n in ("8K", "V3_16K")}
    assert runs == {"", "V3"}
    curve = lambda c: ([r["bpp"] for r in rows if r["codec"] == c], [r["psnr_rgb"] for r in rows if r["codec"] == c])  # noqa: E731
    assert bd["ablation"]["V3"]["bd_rate_rgb"] == rd.bd_rate(*curve("TeNeRV"), *curve("TeNeRV V3"))
    assert json.load(open(os.path.join(out, "bd.json")))["ablation"]["V3"] == bd["ablation"]["V3"]
    assert "TeNeRV V3 vs TeNeRV (Table III)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs 2 or more --params"):
        rd.main(["--frames", folder, "--params", "8K", "--ablation", "V3", "--out", out])
    with pytest.raises(SystemExit, match="unknown"):
        rd.main(["--frames", folder, "--params", "8K,16K", "--ablation", "V9", "--out", out])
