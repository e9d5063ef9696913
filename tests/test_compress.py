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
    for bits in (8, 6):  # int8-weight-like: 4 large peaked tensors, 30 small, 1.2M symbols; then at 6 bits
        values = compress.synthetic_weights(bits=bits)
        assert sum(len(v) for v in values) >= 1_000_000 and max(abs(v.astype(int) - 128).max() for v in values) == compress.qmax(bits)
        data = roundtrip(values)
        entropy = compress.entropy_bytes(values)
        assert entropy < len(data) <= 1.01 * entropy, (bits, len(data) / entropy)  # an adaptive code cannot beat H0
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
    log_step = compress.quantize(w)[1].float().log().requires_grad_()
    w_hat, x = compress.fake_quantize(w, log_step, 8)
    assert torch.equal(w_hat, compress.dequantize(*compress.quantize(w)))  # the file's weights, in the forward pass
    w_hat.sum().backward()
    inside = x.abs().reshape(-1) < 127  # straight-through inside the range (the largest |w| may sit on its edge)
    assert inside.sum() >= 9 and torch.equal(w.grad[inside], torch.ones(int(inside.sum())))
    step = log_step.exp().half().float()  # LSQ: d w_hat / d step = round(x) - x inside, +-127 on the edge
    expected = torch.where(inside, x.round() - x, x.sign() * 127).reshape(-1).sum() * step
    assert log_step.grad.item() == pytest.approx(expected.item(), rel=1e-4)


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
    steps = compress.qat(m, frames, 4, CPU, log=lambda *a: None)
    data, _ = compress.encode_model(m, state["boundaries"], steps=steps)
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
    assert lines[-1].startswith(f"synthetic 8-bit: {sum(len(v) for v in synthetic)} symbols, {len(synthetic)} tensors")
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


# --- bit depths, pruning and the rate term (issue 23) ---------------------------------------------

def test_round_trip_at_every_bit_depth(trained):
    """At 4..8 bits, with the default steps and with learned ones, and grids at another depth than
    the network: the file holds each tensor's depth and gives back bit-identical weights."""
    model, state, _, _ = trained
    sizes = {}
    for bits, bits_grids in [(4, 0), (5, 0), (6, 0), (7, 0), (8, 0), (7, 5)]:
        cc = compress.CompressConfig(bits=bits, bits_grids=bits_grids)
        # steps a QAT run could have learned: a little smaller than largest |w| / qmax, so some values clip
        steps = {n: (compress.quantize(p, compress.tensor_bits(n, cc))[1].float() * 0.8).half()
                 for n, p in model.named_parameters()}
        for coder in ("auto", "zstd"):
            data, report = compress.encode_model(model, state["boundaries"], coder, cc, steps)
            decoded, _ = compress.decode_model(data)
            _, _, tensors = compress.read_tensors(data)
            for (name, p), (name_file, _, bits_file, _, v) in zip(model.named_parameters(), tensors):
                b = compress.tensor_bits(name, cc)
                assert name_file == name and bits_file == b
                q, scale = compress.quantize(p, b, steps[name])
                assert q.abs().max() == compress.qmax(b)  # clipped at the range's edge, not beyond it
                assert (v.astype(int) - 128).min() >= -compress.qmax(b) and (v.astype(int) - 128).max() <= compress.qmax(b)
                assert torch.equal(dict(decoded.named_parameters())[name], compress.dequantize(q, scale)), (bits, name)
        sizes[bits, bits_grids] = len(data)
    assert sizes[4, 0] < sizes[5, 0] < sizes[6, 0] < sizes[7, 0] < sizes[8, 0]  # fewer bits, fewer bytes
    assert sizes[5, 0] < sizes[7, 5] < sizes[7, 0]
    assert "grids.levels.0" in dict(model.named_parameters())  # the grids exist, so bits_grids applied to something


def test_version_1_files_still_decode(rans_file):
    """A version-1 file (no bits field, 8 bits; rANS with 9 blocks and a flat prior) decodes to the
    weights it always did."""
    model, data, _ = rans_file
    secs = sections(data)
    tens = plain(data, b"TENS")
    v1_tens, pos = tens[:2], 2  # drop every tensor's bits byte
    for _ in range(struct.unpack_from("<H", tens)[0]):
        ln = tens[pos]
        nd = tens[pos + 1 + ln]
        head = 1 + ln + 1 + 4 * nd
        ns = struct.unpack_from("<I", tens, pos + head + 2)[0]
        v1_tens += tens[pos: pos + head + 1] + tens[pos + head + 2: pos + head + 6 + 2 * ns + 2]
        pos += head + 6 + 2 * ns + 2
    _, _, tensors = compress.read_tensors(data)
    v1 = []
    for s in secs:
        if s[0] == b"TENS":
            s = [b"TENS", 0, len(v1_tens), v1_tens]
        elif s[0] in (b"BIG_", b"SMAL"):  # re-coded with the version-1 rANS model
            values = [v for name, shape, _, _, v in tensors if (np.prod(shape) < compress.SMALL) == (s[0] == b"SMAL")]
            coder = compress.RANSCoder([len(v) for v in values], [compress.symbol_range(v) for v in values], version=1)
            s = [s[0], 2, s[2], coder.encode(np.concatenate(values))]
        v1.append(s)
    old = repack(v1, version=1)
    decoded, _ = compress.decode_model(old)
    for name, p in model.named_parameters():
        assert torch.equal(dict(decoded.named_parameters())[name], compress.dequantize(*compress.quantize(p))), name
    with pytest.raises(compress.FormatError):  # and the version byte decides how TENS is read
        compress.decode_model(repack(v1, version=2))


def test_header_fields_of_version_2_are_checked(trained, tmp_path):
    model, state, _, _ = trained
    data, _ = compress.encode_model(model, state["boundaries"], "zstd", compress.CompressConfig(bits=6))
    tens = plain(data, b"TENS")
    ln = tens[2]
    nd = tens[3 + ln]
    at_bits = 2 + 1 + ln + 1 + 4 * nd + 1  # the first tensor's bits byte
    ns = struct.unpack_from("<I", tens, at_bits + 1)[0]
    at_lo = at_bits + 5 + 2 * ns
    assert tens[at_bits] == 6
    with_tens = lambda raw: replaced(data, b"TENS", coder=0, raw_len=len(raw), stored=raw)  # noqa: E731
    cases = [
        (tens[:at_bits] + bytes([3]) + tens[at_bits + 1:], "has 3 bits, expected 4 to 8"),
        (tens[:at_bits] + bytes([9]) + tens[at_bits + 1:], "has 9 bits"),
        (tens[:at_lo] + struct.pack("<bb", -40, 5) + tens[at_lo + 2:], "from -40 to 5"),    # beyond +-31
        (tens[:at_lo] + struct.pack("<bb", 5, -5) + tens[at_lo + 2:], "from 5 to -5"),      # lo > hi
        (tens[:at_bits - 1] + bytes([2]) + tens[at_bits:], "in section 2"),
        (tens + b"\0", "after its"),
    ]
    for raw, phrase in cases:
        with pytest.raises(compress.FormatError, match=phrase):
            compress.decode_model(with_tens(raw))
    # through the CLI: the bits field, not the CRC (re-packed with a fresh one), stops decode in one line
    bad = tmp_path / "bits9.tnrv"
    bad.write_bytes(with_tens(cases[1][0]))
    with pytest.raises(SystemExit) as e:
        compress.main(["decode", str(bad), "--out", str(tmp_path / "frames")])
    name = next(iter(dict(model.named_parameters())))
    assert str(e.value.code) == f"error: corrupted: tensor {name} has 9 bits, expected 4 to 8"
    assert not os.path.exists(tmp_path / "frames") or not os.listdir(tmp_path / "frames")
    # a raw section whose values leave their tensor's range (rANS cannot, raw and zstd can)
    raw = bytearray(plain(data, b"SMAL"))  # (this tiny model has every tensor in SMAL)
    raw[0] = 255
    with pytest.raises(compress.FormatError, match="outside its range"):
        compress.decode_model(replaced(data, b"SMAL", coder=0, stored=bytes(raw)))
    for cut in range(0, len(data), max(1, len(data) // 40)):  # truncations stay one-line errors
        with pytest.raises(compress.FormatError, match="truncated|corrupted"):
            compress.decode_model(data[:cut])


def test_pruning_keeps_its_mask_through_qat_and_the_file(trained):
    model, state, frames, _ = trained
    m = copy.deepcopy(model)
    masks = compress.prune_masks(m, 0.3)
    params = dict(m.named_parameters())
    assert masks and set(masks) == {n for n, p in params.items()
                                    if n.startswith(("blocks.", "head.")) and n.endswith(".weight") and p.dim() >= 2}
    for name, mask in masks.items():  # exactly the smallest 30% of each tensor
        p = params[name].detach()
        assert int((~mask).sum()) == int(0.3 * p.numel())
        assert p[~mask].abs().max() <= p[mask].abs().min()
    compress.qat(m, frames, 1, CPU, masks=masks, log=lambda *a: None, float_weights=True)  # fine-tuning
    cc = compress.CompressConfig(bits=6, prune=0.3)
    steps = compress.qat(m, frames, 1, CPU, cc, masks, log=lambda *a: None)
    decoded, _ = compress.decode_model(compress.encode_model(m, state["boundaries"], cc=cc, steps=steps)[0])
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all() and (params[name][mask] != 0).all(), name
        assert (dict(decoded.named_parameters())[name][~mask] == 0).all(), name
    assert (params["grids.levels.0"] != 0).all()  # not pruned


def test_rate_term_is_the_histogram_entropy_and_its_gradient_lowers_it():
    torch.manual_seed(0)
    # at integer x, the estimate is n * H of the histogram with the KT prior, by hand
    x = torch.tensor([0.0, 0, 0, 1, -1, 2])
    h = torch.tensor([0.0] * 6 + [1, 3, 1, 1] + [0.0] * 5)  # -7..7 at 4 bits: counts of -1, 0, 1, 2
    p = (h + 0.5) / (6 + 0.5 * 15)
    assert compress.rate_bits([x], [4], smooth=False).item() == pytest.approx(-(h * p.log2()).sum().item(), rel=1e-6)
    # between integers, linear: x = 0.25 counts 3/4 at 0 and 1/4 at 1
    assert compress.rate_bits([torch.tensor([0.25])], [4], smooth=False).item() == pytest.approx(
        -(0.75 * np.log2(1.25 / 8.5) + 0.25 * np.log2(0.75 / 8.5)), rel=1e-5)  # n + 15 / 2 = 8.5
    # what QAT descends: a comb (every other value empty) saves a bit per value in the histogram's
    # own entropy, nothing once the histogram is blurred; the blur keeps each tensor's mass
    comb, flat = torch.arange(-30, 31, 2.0).repeat(200), torch.arange(-30, 31, 1.0).repeat(100)
    bits_per_value = lambda x, smooth: compress.rate_bits([x], [6], smooth).item() / len(x)  # noqa: E731
    assert bits_per_value(flat, False) - bits_per_value(comb, False) == pytest.approx(1, abs=0.05)
    assert bits_per_value(comb, True) == pytest.approx(bits_per_value(flat, True), abs=0.05)
    assert bits_per_value(flat, True) == pytest.approx(bits_per_value(flat, False), abs=0.05)
    a, b = torch.full((50,), 7.0), torch.full((30,), -31.0)  # the last bin of one tensor, the first of the next
    alone = compress.rate_bits([a], [4]).item() + compress.rate_bits([b], [6]).item()
    assert compress.rate_bits([a, b], [4, 6]).item() == pytest.approx(alone, rel=1e-6)  # no mass crosses
    # descending the estimate alone makes it smaller, with finite gradients, for tensors of two depths
    xs = [(torch.randn(2000) * 6).clamp(-31, 31).requires_grad_(), (torch.randn(300) * 2).clamp(-7, 7).requires_grad_()]
    first = compress.rate_bits(xs, [6, 4]).item()
    for _ in range(20):
        rate = compress.rate_bits(xs, [6, 4])
        grads = torch.autograd.grad(rate, xs)
        assert all(torch.isfinite(g).all() for g in grads)
        with torch.no_grad():
            for x, g in zip(xs, grads):
                x.sub_(0.5 * g.sign()).clamp_(-31, 31)
    assert compress.rate_bits(xs, [6, 4]).item() < 0.9 * first


def test_rate_aware_qat_trades_bits_for_quality(trained):
    """With λ, QAT's loss includes the estimated rate: the gradient is finite, the estimate drops,
    and so does the file (the estimate follows the file's weight bytes within a few per cent)."""
    model, state, frames, _ = trained
    results = {}
    for lmbda in (0.0, 1.0):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        cc = compress.CompressConfig(bits=6, lmbda=lmbda)
        steps = compress.qat(m, frames, 3, CPU, cc, log=lambda *a: None)
        assert all(torch.isfinite(p).all() for p in m.parameters()) and all(torch.isfinite(s.float()).all() for s in steps.values())
        data, report = compress.encode_model(m, state["boundaries"], cc=cc, steps=steps)
        weights = report["sections"]["BIG_"]["bytes"] + report["sections"]["SMAL"]["bytes"]
        assert report["rate_estimate_bits"] / 8 == pytest.approx(weights, rel=0.1)
        p = tenerv.evaluate(compress.decode_model(data)[0], frames, CPU)[0].mean().item()
        results[lmbda] = (report["rate_estimate_bits"], len(data), p)
    (r0, b0, p0), (r1, b1, p1) = results[0.0], results[1.0]
    assert r1 < 0.95 * r0 and b1 < 0.95 * b0, results  # measured: 0.89 and 0.92
    assert p1 < p0 + 0.5, results  # fewer bits are not free


def test_cli_encode_with_bits_prune_and_lambda(trained, tmp_path, capsys):
    _, _, _, run = trained
    out = str(tmp_path / "small.tnrv")
    compress.main(["encode", str(run), "-o", out, "--qat-epochs", "1", "--bits", "5", "--bits-grids", "6",
                   "--prune", "0.2", "--prune-epochs", "1", "--lambda", "0.05"])
    report = json.load(open(tmp_path / "small.json"))
    assert (report["bits"], report["bits_grids"], report["prune"], report["prune_epochs"], report["lmbda"]) == (5, 6, 0.2, 1, 0.05)
    text = capsys.readouterr().out
    assert "pruned" in text and "5-bit (grids 6), 20% pruned, λ 0.05" in text
    _, _, tensors = compress.read_tensors(open(out, "rb").read())
    assert {name: b for name, _, b, _, _ in tensors}["grids.levels.0"] == 6 and {b for _, _, b, _, _ in tensors} == {5, 6}
    compress.main(["bench", out, "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "BIG_ (6/5-bit tensors" in lines[0] and "SMAL" in lines[1] and lines[2].startswith("synthetic 6-bit: ")
    for argv, expect in [(["--bits", "3"], "--bits 3: expected 4 to 8"), (["--bits", "9"], "--bits 9"),
                         (["--bits-grids", "12"], "--bits-grids 12"), (["--prune", "1"], "--prune 1.0"),
                         (["--prune-epochs", "2"], "only with --prune"), (["--lambda", "-1"], "--lambda -1.0"),
                         (["--lambda", "nan"], "--lambda nan")]:
        with pytest.raises(SystemExit) as e:
            compress.main(["encode", str(run), "-o", str(tmp_path / "x.tnrv")] + argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and expect in msg and "\n" not in msg, msg
    assert not os.path.exists(tmp_path / "x.tnrv")
