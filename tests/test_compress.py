"""Tests for compress.py: the rANS coder, QAT, the bitstream and its error handling."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import compress  # noqa: E402
import tenerv  # noqa: E402
from test_tenerv import sample_frames, write_frames  # noqa: E402

CPU = torch.device("cpu")


def roundtrip(values):
    values = [np.asarray(v, np.uint8) for v in values]
    data = compress.rans_encode(values)
    coder = compress.RANSCoder([len(v) for v in values], [compress.symbol_range(v) for v in values])
    out = coder.decode(data, sum(len(v) for v in values))
    assert np.array_equal(out, np.concatenate(values) if values else np.zeros(0, np.uint8))
    return data


def laplace(rng, n, scale):
    return (np.clip(np.round(rng.laplace(0, scale, n)), -127, 127) + 128).astype(np.uint8)


# --- the coder ------------------------------------------------------------------------------------

def test_rans_roundtrips():
    rng = np.random.default_rng(1)
    roundtrip([rng.integers(0, 256, 5000)])                       # uniform
    roundtrip([laplace(rng, 20000, 2), laplace(rng, 300, 30)])     # peaked, two contexts
    roundtrip([])                                                  # nothing at all
    roundtrip([np.zeros(0), np.array([7]), np.zeros(0)])           # empty contexts and one symbol
    roundtrip([np.full(10000, 200)])                               # all equal: a single-symbol alphabet
    roundtrip([np.arange(256), np.arange(256)[::-1]])              # every value once
    roundtrip([np.array([0, 255] * 3000)])                         # the extremes only
    assert len(roundtrip([np.full(100000, 3)])) < 4 * 128 + 100    # a certain symbol costs ~nothing


def test_rans_size_within_one_percent_of_entropy():
    values = compress.synthetic_weights()  # int8-weight-like: 4 large peaked tensors, 30 small, 1.2M symbols
    assert sum(len(v) for v in values) >= 1_000_000
    data = roundtrip(values)
    entropy = compress.entropy_bytes(values)
    assert len(data) <= 1.01 * entropy, len(data) / entropy


def test_rans_detects_damage():
    rng = np.random.default_rng(3)
    values = [laplace(rng, 30000, 5)]
    data = compress.rans_encode(values)
    coder = compress.RANSCoder([30000], [compress.symbol_range(values[0])])
    with pytest.raises(compress.FormatError):
        coder.decode(data[:-10], 30000)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(compress.FormatError):
        coder.decode(bytes(bad), 30000)


# --- quantization and the bitstream -------------------------------------------------------------

def test_quantize_per_slice_and_exact_dequantize():
    w = torch.randn(64, 300)
    w[3] *= 100     # one loud row: per-slice scales keep the others precise
    w[5, 7] = -9.0  # a row whose largest |value| is negative
    q, scale = compress.quantize(w)
    assert q.dtype == torch.int8 and len(scale) == 64
    # every slice uses the whole 8-bit range: its largest |value| maps to exactly +-127, with its sign
    rows, peak = torch.arange(64), w.abs().argmax(1)
    assert torch.equal(q[rows, peak].long(), 127 * w[rows, peak].sign().long())
    assert q.abs().max() == 127
    # and every value is within half of its own slice's step (not the loud row's)
    err = (compress.dequantize(q, scale) - w).abs()
    assert (err <= scale.float()[:, None] / 2 * 1.0001).all()
    assert scale.float().median() < scale.float()[3] / 50
    q1, s1 = compress.quantize(torch.randn(10, 5))  # small slices: one scale for the tensor
    assert len(s1) == 1 and q1.abs().max() == 127
    # an all-zero slice: zeros, and no 0 / 0 on the way (the scale stays positive in float16)
    q0, s0 = compress.quantize(torch.zeros(2, 300))
    assert (q0 == 0).all() and (s0 > 0).all()
    w = torch.randn(10, requires_grad=True)
    compress.fake_quantize(w).sum().backward()
    assert torch.equal(w.grad, torch.ones(10))  # straight-through


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few epochs on real frames, with its run folder."""
    out = tmp_path_factory.mktemp("run")
    frames = sample_frames(8, size=(48, 32))
    cfg = tenerv.size_model(tenerv.TeNeRVConfig(n_frames=8, height=32, width=48, params=15_000, strides=(2, 2),
                                                gops=2, min_gop=2, epochs=12, checkpoint_seconds=1e9))
    model, state = tenerv.train(cfg, frames, str(out), CPU, log=lambda *a: None)
    folder = write_frames(str(out / "frames"), frames.permute(0, 2, 3, 1).numpy())
    json.dump(dict(frames=folder, size=None), open(out / "metrics.json", "w"))
    return model, state, frames, out


def test_encode_decode_bit_exact(trained):
    model, state, frames, _ = trained
    data, report = compress.encode_model(model, state["boundaries"])
    decoded, boundaries = compress.decode_model(data)
    assert boundaries == state["boundaries"]
    assert torch.equal(decoded.gop_of_frame, model.gop_of_frame)
    for name, p in model.named_parameters():
        q, scale = compress.quantize(p)
        assert torch.equal(dict(decoded.named_parameters())[name], compress.dequantize(q, scale)), name
    again, _ = compress.decode_model(data)
    assert torch.equal(again(torch.arange(8)), decoded(torch.arange(8)))  # identical frames
    assert set(report["shares"]) >= {"grids", "iff", "gop_grids", "depthwise", "pointwise", "head", "header"}
    assert abs(sum(report["shares"].values()) - 1) < 1e-6
    zdata, zreport = compress.encode_model(model, state["boundaries"], coder="zstd")
    assert {s["coder"] for s in zreport["sections"].values()} == {"zstd"}
    zdec, _ = compress.decode_model(zdata)
    for (n, a), b in zip(decoded.named_parameters(), zdec.parameters()):
        assert torch.equal(a, b), n


def test_qat_keeps_quality(trained):
    model, state, frames, _ = trained
    import copy
    m = copy.deepcopy(model)
    p_float = tenerv.evaluate(m, frames, CPU)[0].mean().item()
    data, _ = compress.encode_model(m, state["boundaries"])
    p_ptq = tenerv.evaluate(compress.decode_model(data)[0], frames, CPU)[0].mean().item()
    torch.manual_seed(0)
    compress.qat(m, frames, 4, CPU, log=lambda *a: None)
    data, _ = compress.encode_model(m, state["boundaries"])
    p_qat = tenerv.evaluate(compress.decode_model(data)[0], frames, CPU)[0].mean().item()
    assert p_qat > p_float - 0.3, (p_float, p_ptq, p_qat)


def test_corruption_is_always_a_clear_error(trained):
    model, state, _, _ = trained
    data, _ = compress.encode_model(model, state["boundaries"])
    rng = np.random.default_rng(4)
    offsets = list(range(0, 80)) + rng.integers(0, len(data), 120).tolist()
    for off in offsets:
        bad = bytearray(data)
        bad[off] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(compress.FormatError):
            compress.decode_model(bytes(bad))
    for cut in sorted(set(rng.integers(0, len(data), 60).tolist() + [0, 3, 6, len(data) - 1])):
        with pytest.raises(compress.FormatError, match="truncated|corrupted"):
            compress.decode_model(data[:cut])
    with pytest.raises(compress.FormatError, match="not a TeNeRV file"):
        compress.decode_model(b"PNG!" + data[4:])
    newer = bytearray(data)
    newer[4] = compress.FORMAT_VERSION + 1
    with pytest.raises(compress.FormatError, match="newer than this decoder"):
        compress.decode_model(bytes(newer))


def test_cli_encode_decode(trained, tmp_path, capsys):
    _, _, frames, run = trained
    out = str(tmp_path / "clip.tnrv")
    compress.main(["encode", str(run), "-o", out, "--qat-epochs", "1"])
    report = json.load(open(tmp_path / "clip.json"))
    for key in ("bytes", "bpp", "psnr", "msssim", "psnr_float", "shares", "sections"):
        assert key in report
    assert report["bytes"] == os.path.getsize(out)
    assert report["bpp"] == pytest.approx(8 * report["bytes"] / (8 * 32 * 48))
    compress.main(["decode", out, "--out", str(tmp_path / "dec"), "--frames", str(run / "frames")])
    text = capsys.readouterr().out
    assert "frames/s" in text and "PSNR" in text
    assert len(os.listdir(tmp_path / "dec")) == 8
    compress.main(["bench", out, "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("synthetic: 1202554 symbols") and "decode" in lines[-1] and "Msym/s" in lines[-1]


def test_cli_errors_are_one_line_and_keep_existing_files(trained, tmp_path):
    _, _, _, run = trained
    existing = tmp_path / "clip.tnrv"
    existing.write_bytes(b"precious")
    for argv, expect in [
        (["decode", str(existing), "--out", str(tmp_path / "d")], "not a TeNeRV file"),
        (["decode", str(tmp_path / "missing.tnrv"), "--out", str(tmp_path / "d")], "no such file"),
        (["bench", str(tmp_path / "missing.tnrv")], "no such file"),
        (["bench", str(existing), "--repeats", "0"], "--repeats 0"),
        (["encode", str(tmp_path), "-o", str(existing)], "ckpt.pt: not found"),
        (["encode", str(run), "-o", str(existing), "--frames", str(tmp_path / "nope")], "no such file or folder"),
    ]:
        with pytest.raises(SystemExit) as e:
            compress.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and expect in msg and "\n" not in msg, msg
    assert existing.read_bytes() == b"precious"
