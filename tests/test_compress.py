"""Tests for compress.py: the rANS coder, QAT, the bitstream and its error handling."""
import copy
import json
import os
import struct
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import compress  # noqa: E402
import tenerv  # noqa: E402
from test_tenerv import sample_frames, tiny_cfg, write_frames  # noqa: E402

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
    assert entropy < len(data) <= 1.01 * entropy, len(data) / entropy  # an adaptive code cannot beat H0
    # the yardstick by hand: 1 bit per symbol for two equally frequent values, 0 for a constant
    assert compress.entropy_bytes([np.array([3, 3, 9, 9], np.uint8), np.full(5, 7, np.uint8)]) == pytest.approx(0.5)


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


@pytest.fixture(scope="module")
def rans_file():
    """An untrained tiny stage-2 model with tensors of >= 4096 values (section BIG_) and smaller ones
    (SMAL), and its file. Each tensor's values sit in one narrow band, alternately positive and
    negative: per-tensor tables (rANS) beat one table for the whole section (zstd) by ~15%, so the
    file's BIG_ and SMAL are rANS-coded."""
    cfg = tiny_cfg(params=30_000)
    model = tenerv.TeNeRV(cfg)
    model.split_gops([4])
    torch.manual_seed(0)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_((-1) ** i * (0.8 + 0.2 * torch.rand(p.shape)))
    assert max(p.numel() for p in model.parameters()) >= compress.SMALL
    data, report = compress.encode_model(model, [4])
    return model, data, report


def sections(data):
    """The sections of a file in order, as [tag, coder, raw_len, stored] (what repack takes)."""
    out, pos = [], compress.HEAD.size
    while pos < len(data):
        tag, coder, raw_len, n, _ = compress.SECTION.unpack_from(data, pos)
        pos += compress.SECTION.size
        out.append([tag, coder, raw_len, data[pos: pos + n]])
        pos += n
    return out


def repack(secs, version=compress.FORMAT_VERSION):
    """A file of these sections, each with a fresh CRC32: it passes the CRC checks whatever it holds."""
    return (compress.HEAD.pack(compress.MAGIC, version, len(secs))
            + b"".join(compress.write_section(*s) for s in secs))


def replaced(data, tag, coder=None, raw_len=None, stored=None):
    """data with fields of one section replaced (None: kept), re-packed with fresh CRCs."""
    secs = sections(data)
    for s in secs:
        if s[0] == tag:
            s[1:] = [s[1] if coder is None else coder, s[2] if raw_len is None else raw_len,
                     s[3] if stored is None else stored]
    return repack(secs)


def with_conf(data, raw):
    """data with these bytes as its CONF section (stored raw), re-packed with fresh CRCs."""
    return replaced(data, b"CONF", coder=0, raw_len=len(raw), stored=raw)


def plain(data, tag):
    """The decoded bytes of a raw- or zstd-coded section (CONF, TENS)."""
    coder, raw_len, stored = compress.read_sections(data)[tag]
    return compress.unpack_plain(coder, raw_len, stored, tag)


def test_rans_sections_through_the_file(rans_file):
    model, data, report = rans_file
    assert report["sections"]["BIG_"]["coder"] == report["sections"]["SMAL"]["coder"] == "rANS"
    coders = {tag: coder for tag, coder, _, _ in sections(data)}
    assert coders[b"BIG_"] == coders[b"SMAL"] == 2  # the file says so too (coder id 2)
    assert report["sections"]["BIG_"]["symbols"] >= compress.SMALL
    decoded, boundaries = compress.decode_model(data)
    assert boundaries == [4]
    for name, p in model.named_parameters():
        assert torch.equal(dict(decoded.named_parameters())[name], compress.dequantize(*compress.quantize(p))), name
    for tag in ("BIG_", "SMAL"):  # each section keeps the smallest of its candidates
        info = report["sections"][tag]
        assert info["bytes"] == compress.SECTION.size + min(info["rans_bytes"], info["zstd_or_raw_bytes"])
    raw = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert compress.smallest(raw) == (0, raw) and compress.smallest(bytes(1000))[0] == 1  # zstd only where it wins
    zdec, _ = compress.decode_model(compress.encode_model(model, [4], coder="zstd")[0])
    for (name, a), b in zip(decoded.named_parameters(), zdec.parameters()):
        assert torch.equal(a, b), name


def test_valid_crcs_inconsistent_contents_are_clear_errors(rans_file):
    """Files that pass every CRC32 but do not hold a model reach the decoder's later checks, each
    with its own message (matched on stable words, not on how a tag is printed)."""
    model, data, _ = rans_file
    conf = plain(data, b"CONF")
    T = struct.unpack_from("<I", conf)[0]
    json_at = 14 + 4 * (struct.unpack_from("<H", conf, 12)[0] - 1)  # after T, H, W, K and the boundaries
    settings = json.loads(conf[json_at:])
    _, big_values, big = compress.read_sections(data)[b"BIG_"]  # rANS: lane states, then 16-bit words
    cases = [
        (data[:4] + bytes([0]) + data[5:], "unknown file format version"),
        (data + b"\0", "unexpected bytes"),
        (replaced(data, b"TENS", coder=7), "unknown coder"),
        (repack([s for s in sections(data) if s[0] != b"SMAL"]), "missing"),
        (replaced(data, b"CONF", coder=1, stored=b"not a zstd frame"), "does not decompress"),
        (replaced(data, b"CONF", coder=0, raw_len=len(conf) + 1, stored=conf), "the header says"),
        (replaced(data, b"CONF", coder=2), "cannot use coder"),
        (with_conf(data, conf[:-1]), "not parse"),  # JSON cut
        (with_conf(data, struct.pack("<I", T + 1) + conf[4:]), "disagree"),
        (with_conf(data, conf[:14] + struct.pack("<I", 0) + conf[18:]), "GoP boundaries"),  # frame 0
        (with_conf(data, conf[:json_at] + json.dumps(dict(settings, depths=[])).encode()), "does not build a model"),
        (replaced(data, b"BIG_", raw_len=big_values - 1), "the tensors need"),
        (replaced(data, b"BIG_", stored=big + b"\0\0"), "does not end where it should"),
        (replaced(data, b"BIG_", stored=big[: len(big) // 4 * 2]), "truncated"),  # runs out of words
        (replaced(data, b"BIG_", stored=big[:10]), "truncated"),                  # not even the lane states
        (replaced(data, b"BIG_", stored=big[:-1]), "truncated"),                  # half a word
    ]
    # a config that builds another model than the tensors': shapes, a tensor the file lacks, one too many
    other = copy.deepcopy(model)
    other.cfg = replace(model.cfg, kernel=3)
    cases.append((compress.encode_model(other, [4])[0], "does not fit"))
    fewer = copy.deepcopy(model)
    fewer.head.bias = None
    cases.append((compress.encode_model(fewer, [4])[0], "every tensor"))
    more = copy.deepcopy(model)
    more.head.stray = torch.nn.Parameter(torch.ones(3))
    cases.append((compress.encode_model(more, [4])[0], "head.stray does not fit"))
    for bad, phrase in cases:
        with pytest.raises(compress.FormatError, match=phrase):
            compress.decode_model(bad)


def test_qat_keeps_quality(trained):
    model, state, frames, _ = trained
    m = copy.deepcopy(model)
    p_float = tenerv.evaluate(m, frames, CPU)[0].mean().item()
    data, _ = compress.encode_model(m, state["boundaries"])
    p_ptq = tenerv.evaluate(compress.decode_model(data)[0], frames, CPU)[0].mean().item()
    torch.manual_seed(0)
    compress.qat(m, frames, 4, CPU, log=lambda *a: None)
    data, _ = compress.encode_model(m, state["boundaries"])
    p_qat = tenerv.evaluate(compress.decode_model(data)[0], frames, CPU)[0].mean().item()
    assert p_qat > p_float - 0.3, (p_float, p_ptq, p_qat)
    assert p_qat > p_ptq + 0.1, (p_float, p_ptq, p_qat)  # QAT trains: better than the file of the model before it


def test_qat_loss_sees_the_8bit_model(trained, monkeypatch):
    """The loss of QAT's first step is computed on the output of the quantized weights."""
    model, _, frames, _ = trained
    m = copy.deepcopy(model)
    quantized = copy.deepcopy(m)  # the model the file of m would hold
    with torch.no_grad():
        for p in quantized.parameters():
            p.copy_(compress.dequantize(*compress.quantize(p)))
    seen, real = [], tenerv.distortion

    def spy(out, target, cfg, **kw):
        seen.append((out.detach(), target))
        return real(out, target, cfg, **kw)

    monkeypatch.setattr(tenerv, "distortion", spy)
    compress.qat(m, frames, 1, CPU, log=lambda *a: None)
    out, target = seen[0]
    t = torch.tensor([int((frames.float() / 255 - x).abs().flatten(1).sum(1).argmin()) for x in target])
    with torch.no_grad():
        assert torch.allclose(out, quantized(t), atol=1e-6)
        assert (out - model(t)).abs().max() > 1e-4  # and the float model's output is told apart


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
    synthetic = compress.synthetic_weights()  # counted here, not copied from a run
    assert lines[-1].startswith(f"synthetic: {sum(len(v) for v in synthetic)} symbols, {len(synthetic)} tensors")
    assert "decode" in lines[-1] and "Msym/s" in lines[-1]


def test_cli_errors_are_one_line_and_keep_existing_files(trained, tmp_path):
    model, state, frames, run = trained
    existing = tmp_path / "clip.tnrv"
    existing.write_bytes(b"precious")
    # a run whose training stopped early, a run that does not say where its frames are, other frames
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["state"]["epoch"] = 1
    (tmp_path / "early").mkdir()
    torch.save(ckpt, tmp_path / "early" / "ckpt.pt")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes())
    four = write_frames(str(tmp_path / "four"), frames[:4].permute(0, 2, 3, 1).numpy())
    good = tmp_path / "good.tnrv"
    good.write_bytes(compress.encode_model(model, state["boundaries"])[0])
    for argv, expect in [
        (["decode", str(existing), "--out", str(tmp_path / "d")], "not a TeNeRV file"),
        (["decode", str(tmp_path / "missing.tnrv"), "--out", str(tmp_path / "d")], "no such file"),
        (["decode", str(good), "--out", str(tmp_path / "d"), "--frames", four], "do not match the decoded"),
        (["bench", str(tmp_path / "missing.tnrv")], "no such file"),
        (["bench", str(existing), "--repeats", "0"], "--repeats 0"),
        (["encode", str(tmp_path), "-o", str(existing)], "ckpt.pt: not found"),
        (["encode", str(run), "-o", str(existing), "--frames", str(tmp_path / "nope")], "no such file or folder"),
        (["encode", str(run), "-o", str(existing), "--frames", four], "but the run was trained on 8"),
        (["encode", str(run), "-o", str(existing), "--qat-epochs", "-1"], "--qat-epochs -1"),
        (["encode", str(tmp_path / "early"), "-o", str(existing)], "training is not finished (epoch 1/12)"),
        (["encode", str(tmp_path / "bare"), "-o", str(existing)], "pass --frames"),
    ]:
        with pytest.raises(SystemExit) as e:
            compress.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and expect in msg and "\n" not in msg, msg
    assert existing.read_bytes() == b"precious"
