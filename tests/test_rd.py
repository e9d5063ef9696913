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


def cubic_curves():
    """Two RD curves with curvature (log rate a cubic in PSNR), the anchor sampled at 6 PSNRs and the
    other at 4 different ones: a cubic fit recovers them exactly, a straight line does not."""
    log_rate_a = lambda p: -4 + 0.20 * (p - 30) + 0.010 * (p - 30) ** 2 - 0.0004 * (p - 30) ** 3  # noqa: E731
    log_rate_b = lambda p: -4.3 + 0.15 * (p - 30) + 0.020 * (p - 30) ** 2 - 0.0010 * (p - 30) ** 3  # noqa: E731
    psnr_a, psnr_b = np.array([30.0, 32, 34.5, 36, 38, 41]), np.array([31.0, 33, 37, 40])
    return log_rate_a, psnr_a, log_rate_b, psnr_b


def mean_over(f, lo, hi):
    """The mean of f over [lo, hi] by the trapezoid rule on 100001 points (no polynomial fit)."""
    x = np.linspace(lo, hi, 100_001)
    y = f(x)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (hi - lo))


def test_bd_rate_and_bd_psnr_of_curved_curves_against_numerical_integrals():
    log_rate_a, psnr_a, log_rate_b, psnr_b = cubic_curves()
    rate_a, rate_b = np.exp(log_rate_a(psnr_a)), np.exp(log_rate_b(psnr_b))
    # BD-rate: the mean log-rate gap over the PSNR range both cover, [31, 40]
    gap = mean_over(lambda p: log_rate_b(p) - log_rate_a(p), 31, 40)
    assert rd.bd_rate(rate_a, psnr_a, rate_b, psnr_b) == pytest.approx(100 * (np.exp(gap) - 1), abs=1e-6)
    assert rd.bd_rate(rate_b, psnr_b, rate_a, psnr_a) == pytest.approx(100 * (np.exp(-gap) - 1), abs=1e-6)
    # BD-PSNR: PSNR a cubic in log rate, mean PSNR gap over the log-rate range both cover, [-2, 0]
    psnr_of_a = lambda r: 30 + 8 * (r + 3) - 1.5 * (r + 3) ** 2 + 0.2 * (r + 3) ** 3  # noqa: E731
    psnr_of_b = lambda r: 31 + 6 * (r + 3) - 0.5 * (r + 3) ** 2 + 0.1 * (r + 3) ** 3  # noqa: E731
    lr_a, lr_b = np.array([-3.0, -2.5, -2, -1, 0]), np.array([-2.0, -1.2, -0.5, 0.5])
    expected = mean_over(lambda r: psnr_of_b(r) - psnr_of_a(r), -2, 0)
    assert rd.bd_psnr(np.exp(lr_a), psnr_of_a(lr_a), np.exp(lr_b), psnr_of_b(lr_b)) == pytest.approx(expected, abs=1e-6)


def test_bd_json_is_tenerv_against_each_codec():
    """bd_table (what bd.json holds): negative BD-rate and positive BD-PSNR when TeNeRV needs fewer bits."""
    def row(codec, bpp, psnr):
        return dict(codec=codec, bpp=bpp, psnr_rgb=psnr, psnr_yuv=psnr + 1)

    rows = ([row("x264", r, p) for r, p in zip(RATES, PSNRS)] + [row("x265", 2 * r, p) for r, p in zip(RATES, PSNRS)]
            + [row("TeNeRV", 0.5 * r, p) for r, p in zip(RATES, PSNRS)])
    vs = rd.bd_table(rows)["vs"]
    assert set(vs) == {"x264", "x265"}
    assert vs["x264"]["bd_rate_rgb"] == pytest.approx(-50) and vs["x264"]["bd_rate_yuv"] == pytest.approx(-50)
    assert vs["x265"]["bd_rate_rgb"] == pytest.approx(-75)
    assert vs["x264"]["bd_psnr_rgb"] > 0 and vs["x264"]["bd_psnr_yuv"] > 0
    no_tenerv = rd.bd_table([r for r in rows if r["codec"] != "TeNeRV"])["vs"]["x264"]
    assert set(no_tenerv.values()) == {None}


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
@pytest.mark.parametrize("codec,sei", [("x264", {6}), ("x265", {39, 40})], ids=["x264", "x265"])
def test_with_ffmpeg_streams_have_no_sei_and_quality_follows_crf(codec, sei, tmp_path):
    exe, encoders = rd.find_ffmpeg()
    if rd.CODECS[codec][0] not in encoders:
        pytest.skip(f"{exe} has no {rd.CODECS[codec][0]} encoder")
    rgb = sample_frames(4, size=(128, 72)).numpy()  # x265 needs frames larger than its 64x64 blocks
    planes = rd.rgb_to_yuv(rgb)
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


@pytest.mark.skipif("libx264" not in (rd.find_ffmpeg()[1] or ()), reason="no ffmpeg with libx264")
def test_with_ffmpeg_the_whole_evaluation(clip, capsys):
    folder, path, tmp = clip
    out = str(tmp / "with_x264")
    rows, bd = rd.main(["--frames", folder, "--tnrv", path, "--codecs", "x264", "--crf", "30,45", "--out", out])
    assert [(r["codec"], r["setting"]) for r in read_csv(os.path.join(out, "rd.csv"))] == [
        ("TeNeRV", rows[0]["setting"]), ("x264", "crf 30"), ("x264", "crf 45")]
    crf30, crf45 = rows[1:]
    assert crf30["bytes"] > crf45["bytes"] and crf30["psnr_yuv"] > crf45["psnr_yuv"]
    assert crf30["bpp"] == pytest.approx(8 * crf30["bytes"] / (4 * 24 * 40))
    # bd.json is bd_table of the rows in rd.csv; one TeNeRV point gives no BD figure
    saved = json.load(open(os.path.join(out, "bd.json")))
    assert saved["vs"] == rd.bd_table(rows)["vs"] and set(saved["vs"]["x264"].values()) == {None}
    assert saved["skipped"] == {} and "TeNeRV vs x264: BD-rate n/a" in capsys.readouterr().out


def test_budgets_are_trained_once_and_compressed_once(clip, capsys):
    folder, _, tmp = clip
    out = str(tmp / "budgets")
    argv = ["--frames", folder, "--params", "8K", "--epochs", "1", "--codecs", "", "--out", out, "--qat-epochs"]
    rows, _ = rd.main(argv + ["0"])
    first = capsys.readouterr().out
    assert "tenerv_8K: training for 1 epoch" in first and [r["codec"] for r in rows] == ["TeNeRV"]
    assert os.path.exists(os.path.join(out, "tenerv_8K.tnrv"))
    again, _ = rd.main(argv + ["0"])
    second = capsys.readouterr().out
    assert "reusing the finished run" in second and "reusing the compressed file" in second
    assert again == rows
    rd.main(argv + ["1"])  # another QAT length: compressed again, not trained again
    third = capsys.readouterr().out
    assert "reusing the finished run" in third and "reusing the compressed file" not in third


def test_codecs_that_cannot_run_are_reported_skipped(clip, tmp_path):
    """An ffmpeg without an encoder, VVC asked for 4:4:4, and an encoder that fails: each codec is
    skipped with its reason in bd.json, and TeNeRV is still scored."""
    folder, path, _ = clip
    fake = tmp_path / "ffmpeg"  # lists libx264 and libvvenc (not libx265), and fails every encode
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$2\" = -encoders ]; then\n"
                    "  printf ' V..... libx264 H.264\\n V..... libvvenc VVC\\n'; exit 0\n"
                    "fi\n"
                    "echo 'Invalid argument' >&2; exit 1\n")
    fake.chmod(0o755)
    out = str(tmp_path / "out")
    rows, bd = rd.main(["--frames", folder, "--tnrv", path, "--ffmpeg", str(fake), "--chroma", "444",
                        "--codecs", "x264,x265,vvc", "--crf", "30", "--out", out])
    assert [r["codec"] for r in rows] == ["TeNeRV"]
    assert bd["skipped"] == {"x264": "CRF 30: ffmpeg failed (Invalid argument)",
                             "x265": "libx265 is not in this ffmpeg build", "vvc": "libvvenc codes 4:2:0 only"}
    _, bd = rd.main(["--frames", folder, "--tnrv", path, "--ffmpeg", str(tmp_path / "none"), "--codecs", "x264",
                     "--out", out])
    assert bd["skipped"] == {"x264": f"--ffmpeg {tmp_path / 'none'}: cannot run it"}


def test_bad_arguments_are_one_line_errors(clip, tmp_path):
    folder, path, _ = clip
    odd = write_frames(str(tmp_path / "odd"), np.zeros((2, 24, 41, 3), np.uint8))
    three = write_frames(str(tmp_path / "three"), np.zeros((3, 24, 40, 3), np.uint8))
    for argv, msg in ((["--frames", folder], "nothing to evaluate"),
                      (["--frames", odd, "--tnrv", path], "has an odd side"),
                      (["--frames", three, "--tnrv", path], "decodes to 4 frames"),
                      (["--frames", folder, "--tnrv", path, "--epochs", "-1"], "--epochs -1"),
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


def test_bits_and_lambda_sweep_is_one_plot_with_bd_rates_against_the_anchor(clip, tmp_path, capsys):
    """--bits 8,6 --lambda 0,0.5: one run trained, four files (keyed by bits and λ), two curves of
    two points, the 6-bit pipeline's BD-rate against the 8-bit one; a rerun reuses every file and a
    new λ compresses only its own."""
    folder, _, _ = clip
    out = str(tmp_path / "sweep")
    argv = ["--frames", folder, "--params", "8K", "--epochs", "2", "--qat-epochs", "1", "--codecs", "", "--out", out,
            "--bits", "8,6"]
    assert rd.bits_list("8, 6/5") == [(8, 0), (6, 5)]
    rows, bd = rd.main(argv + ["--lambda", "0,0.5"])
    names = ["tenerv_8K.tnrv", "tenerv_8K_l0.5.tnrv", "tenerv_8K_6bit.tnrv", "tenerv_8K_6bit_l0.5.tnrv"]
    assert all(os.path.exists(os.path.join(out, n)) for n in names)
    assert [(r["codec"], r["setting"].split(", ")[-1]) for r in rows] == [
        ("TeNeRV", rows[0]["setting"]), ("TeNeRV", "λ 0.5"), ("TeNeRV 6-bit", rows[2]["setting"]), ("TeNeRV 6-bit", "λ 0.5")]
    assert json.load(open(os.path.join(out, "tenerv_8K_6bit_l0.5.json")))["bits"] == 6
    assert rows[2]["bytes"] < rows[0]["bytes"] and rows[1]["bytes"] < rows[0]["bytes"]  # 6 bits and λ both shrink the file
    curve = lambda c: ([r["bpp"] for r in rows if r["codec"] == c], [r["psnr_rgb"] for r in rows if r["codec"] == c])  # noqa: E731
    assert bd["pipelines"]["TeNeRV 6-bit"]["bd_rate_rgb"] == rd.bd_rate(*curve("TeNeRV"), *curve("TeNeRV 6-bit"))
    assert bd["anchor"] == "8-bit" and json.load(open(os.path.join(out, "bd.json")))["pipelines"] == bd["pipelines"]
    assert "TeNeRV 6-bit vs TeNeRV (8-bit): BD-rate" in capsys.readouterr().out
    again, _ = rd.main(argv + ["--lambda", "0,0.5,2"])
    text = capsys.readouterr().out
    assert text.count("reusing the compressed file") == 4 and text.count(": compressing (") == 2
    assert again[:2] == rows[:2] and len(again) == 6
    for flag, bad, msg in (("--bits", "8,9", "--bits 9: expected 4 to 8"), ("--lambda", "0,x", "--lambda '0,x'"),
                           ("--prune", "1.5", "--prune 1.5"), ("--bits", "6/5/4", "each N or N/G"),
                           ("--bits", "6/3", "--bits-grids 3")):
        with pytest.raises(SystemExit) as e:
            rd.main(["--frames", folder, "--params", "8K", "--out", out, flag, bad])
        assert msg in str(e.value.code) and "\n" not in str(e.value.code)
