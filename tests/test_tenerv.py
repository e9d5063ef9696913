"""Tests for tenerv.py: tiny configs on the CPU, plus one short run on the real sample in data/."""
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tenerv  # noqa: E402
from tenerv import TeNeRVConfig  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "bbb320")


def tiny_cfg(**kw):
    base = dict(n_frames=8, height=24, width=40, params=6000, strides=(2, 2), gops=2, min_gop=2,
                epochs=4, checkpoint_seconds=0.0)
    base.update(kw)
    return tenerv.size_model(TeNeRVConfig(**base))


def write_frames(folder, arrays, ext="png"):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"{i + 1}.{ext}"))
    return folder


def sample_frames(n=8, size=(64, 36)):
    """The first n frames of data/ (real video), downscaled so that a test trains in seconds."""
    names = sorted(os.listdir(DATA))[:n]
    arrays = [np.asarray(Image.open(os.path.join(DATA, f)).convert("RGB").resize(size, Image.LANCZOS)) for f in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def cli_error(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        tenerv.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- parsing and frames in -------------------------------------------------------------

def test_parse_params():
    assert tenerv.parse_params("3M") == 3_000_000
    assert tenerv.parse_params("0.3M") == 300_000
    assert tenerv.parse_params("300K") == 300_000
    assert tenerv.parse_params("3000000") == 3_000_000
    for bad in ("3X", "", "M", "-1", "0"):
        with pytest.raises(ValueError, match="--params"):
            tenerv.parse_params(bad)


def test_frames_natural_order_and_rgb(tmp_path):
    arrays = [np.full((20, 24, 3), 10 * i, np.uint8) for i in range(11)]
    folder = write_frames(str(tmp_path / "f"), arrays)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "f" / "12.png")  # grayscale -> RGB
    frames = tenerv.load_frames(folder)
    assert frames.shape == (12, 3, 20, 24) and frames.dtype == torch.uint8
    assert [int(frames[i, 0, 0, 0]) for i in range(11)] == [10 * i for i in range(11)]  # 2 before 10


def test_yuv_bt709(tmp_path):
    W, H = 32, 16
    # a grey ramp and a pure-ish colour, written as limited-range BT.709 I420
    rgb = np.zeros((2, H, W, 3), np.float64)
    rgb[0] = np.linspace(0.1, 0.9, W)[None, :, None]
    rgb[1] = [0.8, 0.3, 0.2]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    u, v = (b - y) / 1.8556, (r - y) / 1.5748
    Y = np.round(16 + 219 * y).astype(np.uint8)
    U = np.round(128 + 224 * u[:, ::2, ::2]).astype(np.uint8)
    V = np.round(128 + 224 * v[:, ::2, ::2]).astype(np.uint8)
    path = tmp_path / f"clip_{W}x{H}.yuv"
    with open(path, "wb") as f:
        for i in range(2):
            f.write(Y[i].tobytes() + U[i].tobytes() + V[i].tobytes())
    frames = tenerv.load_frames(str(path))
    assert frames.shape == (2, 3, H, W)
    err = np.abs(frames.permute(0, 2, 3, 1).numpy() / 255.0 - rgb)
    assert err[1].max() < 3 / 255  # flat colour: only rounding error
    assert err[0].max() < 3 / 255  # grey: chroma is neutral everywhere
    # the size can also come from --size
    os.rename(path, tmp_path / "clip.yuv")
    assert tenerv.load_frames(str(tmp_path / "clip.yuv"), size=f"{W}x{H}").shape == (2, 3, H, W)


def test_bad_frames_inputs(tmp_path):
    missing = str(tmp_path / "nope")
    assert "no such file or folder" in cli_error(["--frames", missing])
    os.makedirs(tmp_path / "empty")
    assert "no .png/.jpg/.jpeg frames" in cli_error(["--frames", str(tmp_path / "empty")])
    folder = write_frames(str(tmp_path / "mixed"), [np.zeros((20, 24, 3), np.uint8)] * 2 + [np.zeros((22, 24, 3), np.uint8)])
    msg = cli_error(["--frames", folder])
    assert "3.png: frame 2 is 24x22, expected 24x20 like frame 0 (1.png)" in msg
    (tmp_path / "broken").mkdir()
    write_frames(str(tmp_path / "broken"), [np.zeros((20, 24, 3), np.uint8)])
    (tmp_path / "broken" / "2.png").write_bytes(b"not a png")
    assert "2.png: cannot be read as an image" in cli_error(["--frames", str(tmp_path / "broken")])
    tiny = write_frames(str(tmp_path / "tiny"), [np.zeros((8, 8, 3), np.uint8)] * 2)
    assert "at least 16 px" in cli_error(["--frames", tiny])
    (tmp_path / "clip.yuv").write_bytes(bytes(100))
    assert "frame size unknown; pass --size" in cli_error(["--frames", str(tmp_path / "clip.yuv")])
    assert "not a whole number of 32x16" in cli_error(["--frames", str(tmp_path / "clip.yuv"), "--size", "32x16"])
    assert "expected WxH" in cli_error(["--frames", str(tmp_path / "clip.yuv"), "--size", "32by16"])
    (tmp_path / "movie.mp4").write_bytes(b"x")
    assert "not a folder and not a .yuv file" in cli_error(["--frames", str(tmp_path / "movie.mp4")])


def test_bad_flags(tmp_path):
    folder = write_frames(str(tmp_path / "f"), [np.zeros((24, 40, 3), np.uint8)] * 8)
    assert "--params '3X'" in cli_error(["--frames", folder, "--params", "3X"])
    assert "too small for 8 frames of 40x24" in cli_error(["--frames", folder, "--params", "100"])
    assert "need 40 frames but the video has 8" in cli_error(["--frames", folder, "--gops", "4", "--min-gop", "10"])
    assert "--strides" in cli_error(["--frames", folder, "--strides", "5,x"])
    assert "total stride 64 exceeds" in cli_error(["--frames", folder, "--strides", "8,8"])
    assert "--epochs 0" in cli_error(["--frames", folder, "--epochs", "0"])
    assert "--batch-size 0" in cli_error(["--frames", folder, "--batch-size", "0"])
    assert "--window 0" in cli_error(["--frames", folder, "--window", "0"])
    assert "--patches -1: must be 0" in cli_error(["--frames", folder, "--patches", "-1"])
    assert "--depths '1,x': expected integers" in cli_error(["--frames", folder, "--depths", "1,x"])
    assert "--expansions 4,0,1: every entry must be at least 1" in cli_error(["--frames", folder, "--expansions", "4,0,1"])
    assert "need one entry per block, 3 here" in cli_error(["--frames", folder, "--strides", "2,2", "--depths", "1,3"])
    assert "--clip-grad -1.0: must be 0 (off) or more" in cli_error(["--frames", folder, "--clip-grad", "-1"])
    assert "--patches 97: no n_h x n_w split" in cli_error(["--frames", folder, "--patches", "97", "--dry-run"])
    assert "--min-gop -1" in cli_error(["--frames", folder, "--gops", "2", "--min-gop", "-1"])
    (tmp_path / "odd.yuv").write_bytes(bytes(31 * 16 * 3))
    assert "--size 31x16" in cli_error(["--frames", str(tmp_path / "odd.yuv"), "--size", "31x16"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in cli_error(["--frames", folder, "--device", "cuda"])
    assert "no checkpoint to resume" in cli_error(["--frames", folder, "--params", "10K", "--resume",
                                                   "--out", str(tmp_path / "run")])


# --- Eq. 1-3: grids and IFF --------------------------------------------------------------

def test_shapes_and_crop():
    cfg = tiny_cfg(height=22, width=38)  # strides (2, 2) need 24x40: pad, then crop
    model = tenerv.TeNeRV(cfg)
    assert (cfg.base_h, cfg.base_w) == (6, 10)
    t = torch.tensor([0, 3, 7])
    assert model(t).shape == (3, 3, 22, 38)
    X_base = model.grids(torch.arange(cfg.n_frames + cfg.window - 1))
    assert X_base.shape == (cfg.n_frames + cfg.window - 1, sum(cfg.grid_channels), 6, 10)  # Eq. 3: T + l - 1
    assert model.temporal_features(t).shape == (3, sum(cfg.grid_channels), 6, 10)


@pytest.mark.parametrize("size, strides, P", [((24, 40), (2, 2), 2), ((22, 38), (2, 2), 4), ((36, 64), (4, 2), 6),
                                             ((40, 40), (2, 2), 9)])
def test_patches_are_exact_crops_of_the_frame(size, strides, P):
    """--patches: the tiles cover the grid once, and a tile computed from its crop window of block 0's
    output equals the same pixels of the whole frame (the margin reaches every conv's receptive field)."""
    H, W = size
    cfg = tiny_cfg(height=H, width=W, strides=strides, patches=P, params=20000, depths=(2, 2, 1), expansions=(2, 1, 1))
    torch.manual_seed(0)
    model = tenerv.TeNeRV(cfg)
    with torch.no_grad():  # the head's and the units' biases non-zero, so that padding would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tiles, offsets, (h, w) = tenerv.patch_tiling(cfg, model.margin())
    cover = torch.zeros(cfg.base_h, cfg.base_w, dtype=torch.long)
    for y0, y1, x0, x1 in tiles:
        cover[y0:y1, x0:x1] += 1
    assert len(tiles) == P and (cover == 1).all()
    t = torch.arange(P) % cfg.n_frames
    S = math.prod(cfg.strides)

    def assert_tiles_match(margin):  # each tile, computed from its crop window, against the whole frame
        tiles, offsets, (h, w) = tenerv.patch_tiling(cfg, margin)
        with torch.no_grad():
            crops = model(t, (offsets, (h, w)))
        assert crops.shape == (P, 3, h * S, w * S)
        for p, ((y0, y1, x0, x1), (oy, ox)) in enumerate(zip(tiles, offsets)):
            assert oy <= y0 and y1 <= oy + h and ox <= x0 and x1 <= ox + w
            ph, pw = min(y1 * S, H) - y0 * S, min(x1 * S, W) - x0 * S
            got = crops[p, :, (y0 - oy) * S:(y0 - oy) * S + ph, (x0 - ox) * S:(x0 - ox) * S + pw]
            torch.testing.assert_close(got, full[p, :, y0 * S:y0 * S + ph, x0 * S:x0 * S + pw], rtol=0, atol=1e-5)

    with torch.no_grad():
        full = model(t)
        loss, psnrs = tenerv.patch_step(model, (full.clamp(0, 1) * 255).round().to(torch.uint8), t, torch.arange(P),
                                        (tiles, offsets, (h, w)), cfg, l1_only=True)
    assert_tiles_match(model.margin())
    # patch_step compares each pair with its own frame's tile: its loss is the mean L1 of the tiles of the
    # whole frames against those frames (here the model's own output, rounded to 8 bits)
    frames = (full.clamp(0, 1) * 255).round()
    expect = []
    for p, (y0, y1, x0, x1) in enumerate(tiles):
        a = full[p, :, y0 * S:y1 * S, x0 * S:x1 * S]
        expect.append((a - frames[p, :, y0 * S:y1 * S, x0 * S:x1 * S] / 255).abs().mean())
    torch.testing.assert_close(loss, torch.stack(expect).mean(), rtol=1e-4, atol=1e-6)
    assert psnrs.shape == (P,) and (psnrs > 45).all()
    if P > 1:
        with pytest.raises(AssertionError):  # without the margin it is not exact (the check can fail)
            assert_tiles_match(0)


def test_patch_training_sees_every_pair_once_per_epoch(tmp_path, monkeypatch):
    cfg = tiny_cfg(patches=3, epochs=3)
    seen = []
    step = tenerv.patch_step

    def spy(net, frames_dev, t, k, *a):
        seen.append(list(zip(t.tolist(), k.tolist())))
        return step(net, frames_dev, t, k, *a)
    monkeypatch.setattr(tenerv, "patch_step", spy)
    frames = sample_frames(8, size=(40, 24))
    model, state = tenerv.train(replace(cfg, batch_size=2), frames, str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    assert len(seen) == 3 * 4 and all(len(s) == 6 for s in seen)  # 2 frames' worth = 6 pairs per step, 4 steps per epoch
    for e in range(3):
        pairs = [p for s in seen[4 * e:4 * e + 4] for p in s]
        assert sorted(pairs) == [(t, k) for t in range(8) for k in range(3)]
    assert state["history"][-1]["psnr"] > state["history"][0]["psnr"]


def test_grid_linear_interpolation():
    grids = tenerv.TemporalGrids(n_positions=9, channels=(1, 1), h=1, w=1)
    fine, coarse = grids.levels  # 9 and 5 slots
    x = grids(torch.tensor([3]))
    assert torch.allclose(x[0, 0], fine[3, 0])  # level 0: one slot per position
    # level 1: position 3 of 0..8 is relative time 3/8, slot 1.5 of 0..4
    assert torch.allclose(x[0, 1], 0.5 * coarse[1, 0] + 0.5 * coarse[2, 0])


def test_iff_eq2_by_hand():
    cfg = tiny_cfg(window=3)
    model = tenerv.TeNeRV(cfg, stage=2)  # one window per frame
    with torch.no_grad():
        model.iff.weight.copy_(torch.randn_like(model.iff.weight))
    t = 4
    X_base = model.grids(torch.arange(cfg.n_frames + 2))
    w = model.iff.weight[t]
    expected = w[0] * X_base[t] + w[1] * X_base[t + 1] + w[2] * X_base[t + 2]  # Eq. 2, i = 1..l
    assert torch.allclose(model.temporal_features(torch.tensor([t]))[0], expected, atol=1e-6)


def test_iff_window_shared_in_stage_1_copied_per_frame_in_stage_2():
    cfg = tiny_cfg(window=3)
    model = tenerv.TeNeRV(cfg)
    assert model.iff.weight.shape == (1, 3)  # Sec. III-C: stage 1 shares all weights across timestamps
    with torch.no_grad():
        model.iff.weight.copy_(torch.tensor([[0.2, 0.5, -0.1]]))
    t = torch.tensor([0, 5])
    before = model.temporal_features(t)
    X_base = model.grids(torch.arange(cfg.n_frames + 2))
    assert torch.allclose(before[1], 0.2 * X_base[5] + 0.5 * X_base[6] - 0.1 * X_base[7], atol=1e-6)
    model.split_gops([4])
    assert model.iff.weight.shape == (cfg.n_frames, 3)
    assert torch.equal(model.iff.weight, torch.tensor([[0.2, 0.5, -0.1]]).repeat(cfg.n_frames, 1))
    assert torch.allclose(model.temporal_features(t), before)  # the split does not change the function


def test_divergence_eq4():
    X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).view(4, 2, 1, 1)
    assert torch.allclose(tenerv.divergence(X), torch.tensor([0.0, 0.0, 1.0, 1.0]), atol=1e-6)


# --- Algorithm 1 ----------------------------------------------------------------------------

def test_algorithm1_top_candidates_when_valid():
    D = [0, 0.1, 0.2, 0.9, 0.1, 0.1, 0.8, 0.1, 0.1, 0.2]
    assert tenerv.partition_gops(D, K=3, L_min=2) == [3, 6]


def test_algorithm1_replaces_weaker_boundary():
    # candidates by divergence: 5 (0.9), 6 (0.8), 2 (0.7), 8 (0.6), ...
    D = [0, 0.1, 0.7, 0.1, 0.1, 0.9, 0.8, 0.1, 0.6, 0.1]
    # B = {5, 6}: GoP [5, 6) too short -> drop 6 (weaker), add 2: B = {2, 5}, GoPs 2, 3, 5 frames
    assert tenerv.partition_gops(D, K=3, L_min=2) == [2, 5]
    # L_min = 3: {2, 5} leaves [0, 2) short -> drop 2, add 8: {5, 8} leaves [8, 10) short -> drop 8 (0.6 < 0.9)
    # then 1, 3, 4, 7, 9 (all 0.1) each leave a short GoP: the candidates run out -> best valid partition
    assert tenerv.partition_gops(D, K=3, L_min=3) == _brute_force_fallback(D, 3, 3)


def test_algorithm1_is_greedy_not_optimal():
    # B = {6, 5} -> drop 5 (the weaker end of the short GoP [5, 6)), add 2 -> {2, 6} -> drop 6, add 1
    # -> {1, 2} -> drop 1, add 4 -> {2, 4}: valid. The largest total divergence is {2, 5} (1.3 > 0.9).
    assert tenerv.partition_gops([0, .5, .6, 0, .3, .7, 1.0], 3, 2) == [2, 4]


def test_algorithm1_mends_the_earliest_short_gop_first():
    # B = {6, 5}: [5, 6) and [6, 7) are both short. Earliest first: drop 5 (0.9 < 1.0), add 4 ->
    # {4, 6}, drop 6, add 1 -> {1, 4}, drop 1, add 2 -> [2, 4]. Mending [6, 7) first would give [2, 5].
    assert tenerv.partition_gops([0, .7, .3, .2, .8, .9, 1.0], 3, 2) == [2, 4]


def _brute_force_fallback(D, K, L_min):
    import itertools
    T = len(D)
    best = None
    for B in itertools.combinations(range(1, T), K - 1):
        S = (0,) + B + (T,)
        if all(v - u >= L_min for u, v in zip(S, S[1:])):
            score = sum(D[b] for b in B)
            if best is None or score > best[0] + 1e-12:
                best = (score, list(B))
    return best[1]


def test_algorithm1_edge_cases():
    D = [0, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert tenerv.partition_gops(D, K=1, L_min=1) == []                     # K = 1: one GoP
    assert tenerv.partition_gops(D, K=6, L_min=1) == [1, 2, 3, 4, 5]       # every frame its own GoP
    assert tenerv.partition_gops(D, K=3, L_min=2) == [2, 4]                # exactly K * L_min = T
    with pytest.raises(ValueError, match="need 8 frames but the video has 6"):
        tenerv.partition_gops(D, K=4, L_min=2)                             # K * L_min > T
    # candidates exhausted: greedy order 1, 2, 3, 4, 5 never yields a valid set; fallback is valid and best
    rng = np.random.default_rng(0)
    for _ in range(50):
        T, K = int(rng.integers(4, 14)), int(rng.integers(2, 4))
        L_min = int(rng.integers(1, T // K + 1))
        D = [0.0] + rng.random(T - 1).tolist()
        B = tenerv.partition_gops(D, K, L_min)
        S = [0] + B + [T]
        assert len(B) == K - 1 and all(v - u >= L_min for u, v in zip(S, S[1:])), (D, K, L_min, B)


def algorithm1_as_printed(D, K, L_min):
    """Algorithm 1 of the paper line by line, with its 1-based pointer p, written apart from
    tenerv.partition_gops to check it. Frame 0 starts the video and is never a candidate; ties in D
    keep the earlier frame first; line 6 takes the earliest short GoP. Returns None where line 11
    needs a candidate C_p and none is left (the paper does not say what happens then)."""
    T = len(D)
    C = sorted(range(1, T), key=lambda t: (-D[t], t))  # 1: ArgsortDesc(D), C_1 = C[0]
    B = set(C[: K - 1])                                 # 2: {C_1, ..., C_{K-1}}
    p = K                                               # 3
    while True:                                         # 4
        S = sorted(B | {0, T})                          # 5
        short = [(S[i], S[i + 1]) for i in range(len(S) - 1) if S[i + 1] - S[i] < L_min]  # 6
        if not short:                                   # 7
            return sorted(B)                            # 8
        u, v = short[0]
        b = min([x for x in (u, v) if x in B], key=lambda x: D[x])  # 10
        if p > len(C):
            return None
        B = (B - {b}) | {C[p - 1]}                      # 11: C_p
        p = p + 1                                       # 12


def test_algorithm1_matches_the_printed_algorithm_on_random_cases(monkeypatch):
    """Where the greedy loop finishes, partition_gops is Algorithm 1 (and never calls the fallback);
    where it runs out of candidates, the fallback runs and gives the best valid partition."""
    fallbacks, best_partition = [], tenerv._best_partition

    def fallback(D, K, L_min):
        fallbacks.append((D, K, L_min))
        return best_partition(D, K, L_min)

    monkeypatch.setattr(tenerv, "_best_partition", fallback)
    rng = np.random.default_rng(0)
    n_greedy = n_exhausted = 0
    for _ in range(4000):
        T = int(rng.integers(2, 30))
        K = int(rng.integers(2, min(T, 6) + 1))
        L_min = int(rng.integers(1, T // K + 1))  # K * L_min <= T: a valid partition exists
        D = [0.0] + rng.random(T - 1).tolist()
        fallbacks.clear()
        got = tenerv.partition_gops(D, K, L_min)
        expected = algorithm1_as_printed(D, K, L_min)
        if expected is not None:
            n_greedy += 1
            assert got == expected and not fallbacks, (D, K, L_min, got, expected)
        else:
            n_exhausted += 1
            assert len(fallbacks) == 1, (D, K, L_min)
            if T <= 14:
                assert got == _brute_force_fallback(D, K, L_min), (D, K, L_min)
    assert n_greedy > 2000 and n_exhausted > 200, (n_greedy, n_exhausted)  # both kinds were tested


def test_gop_index_and_content_agnostic_gops():
    assert tenerv.gop_index([2, 5], 7).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert tenerv.equal_gops(64, 4) == [16, 32, 48]                    # V5: K equal GoPs
    assert tenerv.equal_gops(250, 2) == [125]
    assert tenerv.fixed_length_gops(250, 2) == [128]                   # V4: 128 frames, the rest last
    assert tenerv.fixed_length_gops(600, 5) == [128, 256, 384, 512]
    assert tenerv.fixed_length_gops(100, 4) == [32, 64, 96]            # the last GoP is 4 frames
    # defaults: K = T/16 in [1, 8], L_min = T/(2K) of the K in use, also when only K is given
    base = dict(n_frames=16, height=24, width=40, params=6000, strides=(2, 2))
    assert (lambda c: (c.gops, c.min_gop))(tenerv.size_model(TeNeRVConfig(**base))) == (1, 8)
    assert (lambda c: (c.gops, c.min_gop))(tenerv.size_model(TeNeRVConfig(**base, gops=2))) == (2, 4)
    assert (lambda c: (c.gops, c.min_gop))(tenerv.size_model(TeNeRVConfig(**base, gops=2, min_gop=3))) == (2, 3)


def test_default_gops_capped_by_budget():
    # 64 frames -> T/16 = 4 GoPs, but at 0.3M each extra GoP costs 3.6% of the budget: K = 2
    for P, K in [(300_000, 2), (30_000_000, 4)]:
        cfg = tenerv.size_model(TeNeRVConfig(n_frames=64, height=180, width=320, params=P))
        full = replace(cfg, ablation="")
        per_gop = tenerv.count_params(replace(full, gops=cfg.gops + 1)) - tenerv.count_params(full)
        assert cfg.gops == K and cfg.min_gop == 64 // (2 * K)
        assert (K - 1) * per_gop <= tenerv.GOP_SHARE * P and (K == 4 or K * per_gop > tenerv.GOP_SHARE * P)
        for ablation in ("V1", "V2", "V3", "V5"):  # the ablations keep the full model's K
            assert tenerv.size_model(TeNeRVConfig(n_frames=64, height=180, width=320, params=P, ablation=ablation)).gops == K
        # V4: fixed-length GoPs, a power of two long, at most K of them
        v4 = tenerv.size_model(TeNeRVConfig(n_frames=64, height=180, width=320, params=P, ablation="V4"))
        assert v4.gops == 64 // tenerv.fixed_gop_length(64, K) <= K
    assert tenerv.size_model(TeNeRVConfig(n_frames=64, height=180, width=320, params=300_000, gops=4)).gops == 4  # --gops wins


# --- parameter budget -------------------------------------------------------------------------

def trained_params(cfg):
    """Parameters of the model training ends with: the stage-1 model built from cfg, split into K
    GoPs as at the stage switch (on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        model = tenerv.TeNeRV(cfg)
        model.split_gops(tenerv.equal_gops(cfg.n_frames, cfg.gops))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("W,H,T,P", [(1920, 1080, 600, 3_000_000), (1280, 720, 132, 3_000_000), (320, 180, 64, 300_000),
                                     (176, 144, 300, 300_000), (320, 136, 50, 300_000), (1920, 1080, 60, 1_500_000),
                                     (320, 180, 16, 100_000), (352, 288, 97, 750_000)])
def test_budget_within_one_percent(W, H, T, P):
    for ablation in ("",) + tenerv.ABLATIONS:
        cfg = tenerv.size_model(TeNeRVConfig(n_frames=T, height=H, width=W, params=P, ablation=ablation))
        n = trained_params(cfg)
        assert abs(n - P) <= 0.01 * P, (ablation, n)
        assert tenerv.count_params(cfg) == n, ablation  # the count that --dry-run and metrics.json report
        assert cfg.base_h * tenerv.math.prod(cfg.strides) >= H and cfg.base_w * tenerv.math.prod(cfg.strides) >= W


def test_grid_stride_keeps_grids_near_their_share():
    def grid_share(cfg):
        with torch.device("meta"):
            model = tenerv.TeNeRV(cfg, stage=2)
        return sum(p.numel() for p in model.grids.parameters()) / tenerv.count_params(cfg)

    # 300 frames of 176x144 at 0.3M: one channel per base position would be 70% of the budget
    video = TeNeRVConfig(n_frames=300, height=144, width=176, params=300_000)
    auto = tenerv.size_model(video)
    n_positions = 300 + auto.window - 1
    cell = auto.base_h * auto.base_w  # values of one channel of one cell
    # the smallest stride whose finest level (one channel) fits in half the grids' share
    assert auto.grid_stride == 2
    assert math.ceil(n_positions / 2) * cell <= auto.grid_share * auto.params / 2 < n_positions * cell
    assert grid_share(auto) <= auto.grid_share + 0.1
    one = tenerv.size_model(replace(video, grid_stride=1))  # an explicit stride wins
    assert one.grid_stride == 1 and grid_share(one) > 0.65
    # the benchmark clip and the motion clips of the suite keep one cell per base position (Eq. 3);
    # bikes64 (320x136) is the size at which a level's third of the share would not (stride 2)
    for H, W, T in [(180, 320, 64), (136, 320, 64), (144, 176, 120)]:
        cfg = tenerv.size_model(TeNeRVConfig(n_frames=T, height=H, width=W, params=300_000))
        assert cfg.grid_stride == 1 and cfg.grid_channels[0] == 1, (H, W, T)


def test_budget_counts_real_stage2_model():
    cfg = tiny_cfg()
    model = tenerv.TeNeRV(cfg)
    model.split_gops([4])
    assert sum(p.numel() for p in model.parameters()) == tenerv.count_params(cfg) == trained_params(cfg)


def test_auto_strides():
    assert tenerv.choose_strides(1080, 1920) == (5, 3, 2, 2)   # 32 x 18 grid
    assert tenerv.choose_strides(720, 1280) == (5, 2, 2, 2)    # 32 x 18
    assert tenerv.choose_strides(180, 320) == (5, 2)           # 32 x 18
    assert tenerv.choose_strides(144, 176) == (2, 2, 2)        # 22 x 18
    assert tenerv.choose_strides(136, 320) == (2, 2, 2)        # 40 x 17


def test_blocks_are_deep_between_the_grid_and_the_full_resolution():
    # 176x144 at 0.3M: grid, x2, x4 and full resolution; the two middle blocks are deep and wide
    cfg = tenerv.size_model(TeNeRVConfig(n_frames=16, height=144, width=176, params=300_000))
    assert cfg.strides == (2, 2, 2)
    assert cfg.depths == (1, 3, 3, 1) and cfg.expansions == (4, 4, 4, 1)
    model = tenerv.TeNeRV(cfg)
    assert [len(b.units) for b in model.blocks] == [1, 3, 3, 1]
    dims = tenerv.block_dims(cfg)
    assert [b.units[0].pw1.out_channels for b in model.blocks] == [cfg.dim_hidden0] + [4 * dims[1], 4 * dims[2], dims[3]]
    # one upsampling block: block 0 is the deep one
    assert tenerv.default_depths(2) == ((3, 1), (4, 1))
    assert tenerv.default_depths(3) == ((1, 3, 1), (4, 4, 1))


def test_depths_and_expansions_from_the_command_line(tmp_path, capsys):
    folder = write_frames(str(tmp_path / "f"), [np.zeros((24, 40, 3), np.uint8)] * 8)
    tenerv.main(["--frames", folder, "--params", "20K", "--strides", "2,2", "--depths", "3,1,1", "--expansions", "4,1,1",
                 "--dry-run"])
    assert "depths 3, 1, 1, MLP expansions 4, 1, 1" in capsys.readouterr().out
    tenerv.main(["--frames", folder, "--params", "20K", "--strides", "2,2", "--dry-run"])
    assert "depths 1, 3, 1, MLP expansions 4, 4, 1" in capsys.readouterr().out


def test_a_tight_budget_gives_up_depth_only_when_the_depths_are_derived():
    # 8 frames of 64x36 at 6K: the deep middle blocks do not fit at the narrowest width (7.8K); one unit each does
    kw = dict(n_frames=8, height=36, width=64, params=6000, strides=(2, 2, 2))
    cfg = tenerv.size_model(TeNeRVConfig(**kw))
    assert cfg.depths == (1, 1, 1, 1) and abs(trained_params(cfg) - 6000) <= 60
    assert tenerv.size_model(TeNeRVConfig(**dict(kw, params=60_000))).depths == (1, 3, 3, 1)
    with pytest.raises(ValueError, match="too small"):  # depths the user set are kept: the budget is refused
        tenerv.size_model(TeNeRVConfig(**kw, depths=(1, 3, 3, 1), expansions=(4, 4, 4, 1)))


@pytest.mark.parametrize("W,H,T,budget", [(64, 36, 8, "20K"), (320, 180, 64, "0.3M")])
def test_dry_run_prints_the_trained_models_count(W, H, T, budget, tmp_path, capsys):
    clip = tmp_path / f"clip_{W}x{H}.yuv"
    clip.write_bytes(bytes(T * W * H * 3 // 2))  # T black frames, YUV 4:2:0
    P = tenerv.parse_params(budget)
    for ablation in ("",) + tenerv.ABLATIONS:
        tenerv.main(["--frames", str(clip), "--params", budget, "--ablation", ablation or "full", "--dry-run"])
        out = capsys.readouterr().out
        printed = int(next(s for s in out.splitlines() if s.startswith("parameters: ")).split()[1])
        cfg = tenerv.size_model(TeNeRVConfig(n_frames=T, height=H, width=W, params=P, ablation=ablation))
        assert printed == trained_params(cfg) and abs(printed - P) <= 0.01 * P, (ablation, printed)
    assert not os.path.exists(f"runs/clip_{budget}")


# --- model behaviour ------------------------------------------------------------------------------

def test_mixed_gop_batch_equals_per_frame():
    cfg = tiny_cfg(n_frames=8, gops=3, min_gop=2)
    model = tenerv.TeNeRV(cfg)
    model.split_gops([3, 6])
    with torch.no_grad():  # make the GoP copies differ, as stage 2 does
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = torch.tensor([0, 4, 7, 2])  # GoPs 0, 1, 2, 0
    batched = model(t)
    single = torch.cat([model(t[i:i + 1]) for i in range(len(t))])
    assert torch.allclose(batched, single, atol=1e-5)


def test_channels_last_activations_change_nothing_but_the_layout():
    # the CUDA path (train, reconstruct) runs with model.channels_last = True; CI has no GPU,
    # so check on the CPU that it trains and gives the same frames and gradients in both stages
    cfg = tiny_cfg(n_frames=8, gops=2, min_gop=2)
    model = tenerv.TeNeRV(cfg)
    t = torch.tensor([0, 5, 7, 2])
    layout = []  # the memory format the blocks receive: the flag must really change it
    model.blocks[0].register_forward_pre_hook(
        lambda m, args: layout.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    for stage in (1, 2):
        if stage == 2:
            model.split_gops([4])
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        out = {}
        for cl in (False, True):
            model.channels_last = cl
            model.zero_grad()
            y = model(t)
            y.square().mean().backward()
            out[cl] = y.detach(), [p.grad.clone() for p in model.parameters()]
        assert layout[-2:] == [False, True]
        assert torch.allclose(out[False][0], out[True][0], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[False][1], out[True][1]))


def test_ablation_structure():
    m1 = tenerv.TeNeRV(tiny_cfg(ablation="V1"))  # V1: no IFF, base grids at the T frames only (l = 1)
    assert m1.iff is None and m1.grids.n_positions == m1.cfg.n_frames
    assert tenerv.TeNeRV(tiny_cfg(ablation="V2")).gop_grid is None
    m3 = tenerv.TeNeRV(tiny_cfg(ablation="V3"))
    m3.split_gops([4])
    assert m3.blocks[0].units[0].dw.weight.shape[0] == 1 and m3.gop_grid.shape[0] == 2
    assert tenerv.size_model(TeNeRVConfig(n_frames=64, height=180, width=320, ablation="V5")).gops == 2


def test_every_variant_runs_in_both_stages():
    t = torch.tensor([0, 5, 7])
    for ablation in ("",) + tenerv.ABLATIONS:
        cfg = tiny_cfg(ablation=ablation)
        model = tenerv.TeNeRV(cfg)
        for stage in (1, 2):
            if stage == 2:
                model.split_gops(tenerv.equal_gops(cfg.n_frames, cfg.gops))
            out = model(t)
            assert out.shape == (3, 3, 24, 40) and torch.isfinite(out).all(), (ablation, stage)
            assert (out[0] - out[2]).abs().max() > 1e-4, (ablation, stage)  # frames differ
    # V1: the features of frame t are the base grids at position t alone (no IFF, l = 1)
    m1 = tenerv.TeNeRV(tiny_cfg(ablation="V1"))
    assert torch.equal(m1.temporal_features(t), m1.grids(t))


def test_tiny_clip_overfits_and_gop_kernels_differ(tmp_path):
    frames = sample_frames(8)
    cfg = tenerv.size_model(TeNeRVConfig(n_frames=8, height=36, width=64, params=20_000, strides=(2, 2),
                                         gops=2, min_gop=2, epochs=40, lr=5e-3, checkpoint_seconds=1e9))
    torch.manual_seed(0)
    model, state = tenerv.train(cfg, frames, str(tmp_path / "run"), torch.device("cpu"), log=lambda *a: None)
    first, last = state["history"][0]["psnr"], state["history"][-1]["psnr"]
    p, m, fps, recon = tenerv.evaluate(model, frames, torch.device("cpu"))
    assert p.mean() > first + 6 and p.mean() > 22, (first, last, p.mean())
    assert len(state["boundaries"]) == 1 and model.stage == 2
    dws = [m for m in model.modules() if isinstance(m, tenerv.GoPDepthwiseConv)]
    assert len(dws) == sum(cfg.depths)
    for dw in dws:  # stage 2 trained the copies apart
        w = dw.weight
        assert w.shape[0] == 2 and (w[0] - w[1]).abs().max() > 1e-4
    assert (model.gop_grid[0] - model.gop_grid[1]).abs().max() > 1e-4
    assert model.iff.weight.shape[0] == 8 and model.iff.weight.std(0).max() > 1e-4  # each frame its own window
    # the checkpoint rebuilds the same model, loading with weights_only=True
    again, ckpt = tenerv.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert torch.equal(again(torch.arange(8)), model(torch.arange(8)))


def test_stage_switch_puts_the_boundary_at_a_scene_cut(tmp_path):
    """Eq. 4 on the pre-trained fused grids + Algorithm 1 find a cut: frames 4.. are another
    scene (the mirrored negative of the real frames). Equal GoPs would split at 6."""
    a = sample_frames(12)
    frames = torch.cat([a[:4], 255 - a[4:].flip(-1)])
    cfg = tenerv.size_model(TeNeRVConfig(n_frames=12, height=36, width=64, params=20_000, strides=(2, 2), gops=2,
                                         min_gop=2, epochs=10, pretrain_epochs=300, l1_epochs=300, lr=5e-3,
                                         checkpoint_seconds=1e9))
    _, state = tenerv.train(cfg, frames, str(tmp_path / "run"), torch.device("cpu"), log=lambda *a: None)
    D = state["divergence"]
    assert state["boundaries"] == [4], (state["boundaries"], D)
    assert D[4] > 2 * max(d for t, d in enumerate(D) if t != 4), D  # the cut stands out, not a near-tie


def test_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    frames = sample_frames(6, size=(40, 24))
    cfg = tenerv.size_model(TeNeRVConfig(n_frames=6, height=24, width=40, params=8000, strides=(2, 2), gops=2,
                                         min_gop=2, epochs=6, checkpoint_seconds=1e9))  # only Ctrl-C writes mid-run
    cpu = torch.device("cpu")
    lines = []
    full, _ = tenerv.train(cfg, frames, str(tmp_path / "a"), cpu, log=lines.append)
    # a caller's log gets the progress, one line per epoch, and nothing goes to stdout
    assert capsys.readouterr().out == ""
    assert [l.split("] ")[1].split(" stage")[0] for l in lines if "psnr" in l] == [f"epoch {e}/6" for e in range(1, 7)]
    assert sum("stage 2: 2 GoPs" in l for l in lines) == 1
    assert not any(l.startswith("\n") for l in lines)  # the terminal's line breaks stay out of a caller's log

    real_lr_at, calls = tenerv.lr_at, []

    def interrupt(step, n_steps, c):  # Ctrl-C in the middle of epoch 4 (after the stage switch)
        calls.append(step)
        if step == 3 * 6 + 2:
            raise KeyboardInterrupt
        return real_lr_at(step, n_steps, c)

    monkeypatch.setattr(tenerv, "lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tenerv.train(cfg, frames, str(tmp_path / "b"), cpu, log=lambda *a: None)
    monkeypatch.setattr(tenerv, "lr_at", real_lr_at)
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 3 and ckpt["stage"] == 2
    resumed, _ = tenerv.train(cfg, frames, str(tmp_path / "b"), cpu, resume=True, log=lambda *a: None)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    with pytest.raises(ValueError, match="other settings"):
        tenerv.train(replace(cfg, lr=1e-3), frames, str(tmp_path / "b"), cpu, resume=True)


def test_gradient_norm_is_clipped_before_each_adam_step(tmp_path, monkeypatch):
    """clip_grad: every Adam step (both stages) sees a gradient of global norm <= clip_grad; 0 = left alone."""
    norms = []
    make = tenerv.make_optimizer

    def spy(model, device):  # the optimiser of both stages, its step reading the gradient's global norm first
        optimizer = make(model, device)
        step = optimizer.step

        def checked(*a, **kw):
            grads = [p.grad.norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.stack(grads).norm().item())
            return step(*a, **kw)
        optimizer.step = checked
        return optimizer
    monkeypatch.setattr(tenerv, "make_optimizer", spy)
    frames = sample_frames(8, size=(40, 24))
    for clip in (1e-3, 0.0):
        norms.clear()
        tenerv.train(tiny_cfg(clip_grad=clip, epochs=2), frames, str(tmp_path / f"clip{clip}"), torch.device("cpu"),
                     log=lambda s: None)
        assert len(norms) == 2 * 8  # a step per frame, 2 epochs
        if clip:
            assert max(norms) <= clip * 1.001
        else:
            assert min(norms) > 1e-3  # unclipped, every step's gradient is larger than the clip above


def test_adam_beta2_is_the_configs_in_both_stages(tmp_path, capsys):
    """beta2 reaches Adam in both stages (the checkpoint is written after the stage switch), the CLI sets and
    prints it, and a checkpoint from before the field existed reads as Adam's default 0.999 it was trained with."""
    cfg = tiny_cfg(beta2=0.9)
    assert tenerv.make_optimizer(tenerv.TeNeRV(cfg), torch.device("cpu")).param_groups[0]["betas"] == (0.9, 0.9)
    tenerv.train(cfg, sample_frames(8, size=(40, 24)), str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == 2 and {g["betas"][1] for g in ckpt["optimizer"]["param_groups"]} == {0.9}
    assert TeNeRVConfig().beta2 == 0.99
    old = {k: v for k, v in ckpt["config"].items() if k != "beta2"}
    assert tenerv.config_from_dict(old).beta2 == 0.999 and tenerv.config_from_dict(ckpt["config"]).beta2 == 0.9
    folder = str(tmp_path / "f")
    write_frames(folder, sample_frames(4, size=(40, 24)).permute(0, 2, 3, 1).numpy())
    tenerv.main(["--frames", folder, "--params", "6000", "--strides", "2,2", "--beta2", "0.95", "--dry-run"])
    assert "optimiser: Adam (beta2 0.95)" in capsys.readouterr().out
    assert "--beta2 1.0: Adam's second-moment decay must be in [0, 1)" in cli_error(["--frames", folder, "--beta2", "1"])


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = TeNeRVConfig(lr=1e-2, warmup=0.1)
    lrs = [tenerv.lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)  # 10 linear warm-up steps
    assert lrs[10] == pytest.approx(1e-2) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5e-2)  # half-way through the cosine
    assert lrs[-1] < 1e-5


def test_loss_is_l1_for_the_l1_epochs_then_adds_msssim(tmp_path, monkeypatch):
    out, target = torch.rand(2, 3, 36, 64), torch.rand(2, 3, 36, 64)
    l1, cfg = (out - target).abs().mean(), TeNeRVConfig()
    assert tenerv.distortion(out, target, cfg, l1_only=True).item() == pytest.approx(l1.item())
    assert tenerv.distortion(out, target, cfg).item() == pytest.approx(
        (0.7 * l1 + 0.3 * (1 - tenerv.msssim(out, target).mean())).item())  # Sec. IV-A, HiNeRV's weights
    flags, real = [], tenerv.distortion

    def spy(out, target, cfg, l1_only=False):
        flags.append(l1_only)
        return real(out, target, cfg, l1_only)

    monkeypatch.setattr(tenerv, "distortion", spy)
    cfg = tenerv.size_model(TeNeRVConfig(n_frames=4, height=24, width=40, params=8000, strides=(2, 2), epochs=4,
                                         l1_epochs=150, batch_size=4, checkpoint_seconds=1e9))  # 2 of 4 epochs L1
    tenerv.train(cfg, sample_frames(4, size=(40, 24)), str(tmp_path / "run"), torch.device("cpu"), log=lambda *a: None)
    assert flags == [True, True, False, False]  # one step per epoch
    assert tenerv.l1_only_epochs(TeNeRVConfig(epochs=300)) == 0  # the default: the hybrid loss from the start
    assert tenerv.l1_only_epochs(TeNeRVConfig(epochs=300, l1_epochs=30)) == 30  # Sec. IV-A's 30 of 300


def test_stage_switch_copies_the_adam_moments():
    cfg = tiny_cfg()
    model = tenerv.TeNeRV(cfg)
    optimizer = tenerv.make_optimizer(model, torch.device("cpu"))
    for g in optimizer.param_groups:
        g["lr"] = 1e-3
    model(torch.arange(4)).square().mean().backward()
    optimizer.step()
    before = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}
    optimizer = tenerv.split_model(model, optimizer, [4], torch.device("cpu"))
    for name, p in model.named_parameters():  # every copy (GoP, frame window) starts from the stage-1 moments
        state = optimizer.state[p]
        assert state["step"] == before[name]["step"], name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[k], before[name][k].expand_as(p)), (name, k)


def test_cli_end_to_end(tmp_path):
    folder = str(tmp_path / "f")
    os.makedirs(folder)
    for i, f in enumerate(sample_frames(4, size=(40, 24)).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(f).save(os.path.join(folder, f"{i}.jpg"), quality=95)
    out = str(tmp_path / "run")
    tenerv.main(["--frames", folder, "--params", "8K", "--epochs", "2", "--strides", "2,2", "--out", out, "--save-frames"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("params", "psnr", "psnr_per_frame", "msssim", "msssim_scales", "gop_boundaries", "divergence",
                "epochs", "train_seconds", "device"):
        assert key in m
    assert len(m["psnr_per_frame"]) == 4 and m["epochs"] == 2 and m["msssim_scales"] == 2
    assert sorted(os.listdir(os.path.join(out, "frames"))) == ["0001.png", "0002.png", "0003.png", "0004.png"]


# --- metrics ----------------------------------------------------------------------------------------

def msssim_by_definition(x, y, n_scales):
    """MS-SSIM (Wang et al. 2003) of two (C, H, W) float64 arrays in [0, 1], in numpy: the first
    n_scales weights renormalised to sum to 1, an 11-tap Gaussian (sigma 1.5) without padding,
    2x2 means between scales (the sides must stay even), negative terms clipped to 0; the mean
    over channels of the per-channel products."""
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:n_scales])
    weights /= weights.sum()
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()

    def blur(a):  # separable, 'valid'
        return np.apply_along_axis(np.convolve, 1, np.apply_along_axis(np.convolve, 0, a, g, "valid"), g, "valid")

    C1, C2 = 0.01 ** 2, 0.03 ** 2
    per_channel = []
    for a, b in zip(x, y):
        value = 1.0
        for i in range(n_scales):
            mu_a, mu_b = blur(a), blur(b)
            var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
            cs = (2 * cov + C2) / (var_a + var_b + C2)
            if i < n_scales - 1:  # contrast-structure at the finer scales
                value *= max(cs.mean(), 0) ** weights[i]
                H, W = a.shape
                a, b = a.reshape(H // 2, 2, W // 2, 2).mean((1, 3)), b.reshape(H // 2, 2, W // 2, 2).mean((1, 3))
            else:  # full SSIM at the coarsest
                value *= max(((2 * mu_a * mu_b + C1) / (mu_a ** 2 + mu_b ** 2 + C1) * cs).mean(), 0) ** weights[i]
        per_channel.append(value)
    return float(np.mean(per_channel))


def test_msssim_matches_pytorch_msssim_and_small_frames():
    from pytorch_msssim import ms_ssim
    x, y = torch.rand(2, 3, 176, 192), torch.rand(2, 3, 176, 192)
    y = 0.7 * x + 0.3 * y
    assert torch.allclose(tenerv.msssim(x, y), ms_ssim(x, y, data_range=1.0, size_average=False), atol=1e-5)
    assert tenerv.msssim_scales(180, 320) == 5 and tenerv.msssim_scales(144, 176) == 4
    assert tenerv.msssim_scales(36, 64) == 2 and tenerv.msssim_scales(16, 16) == 1
    small = torch.rand(1, 3, 36, 64)
    assert tenerv.msssim(small, small).item() == pytest.approx(1.0, abs=1e-5)
    off = torch.stack([small[0] + 0.1, small[0] + 0.01])  # MSE 0.01 and 0.0001
    assert torch.allclose(tenerv.psnr(off, small.expand(2, -1, -1, -1)), torch.tensor([20.0, 40.0]))
    p, m = tenerv.quality(off, (small.expand(2, -1, -1, -1) * 255).round().to(torch.uint8))  # uint8 originals
    assert torch.allclose(p, torch.tensor([20.0, 40.0]), atol=0.1)
    # below 161 px, fewer scales with renormalised weights, against the definition computed apart
    torch.manual_seed(0)
    for (H, W), n in (((16, 16), 1), ((36, 64), 2), ((48, 88), 3), ((96, 128), 4), ((176, 192), 5)):
        assert tenerv.msssim_scales(H, W) == n
        x = torch.rand(1, 3, H, W)
        y = (x + 0.2 * torch.randn(1, 3, H, W)).clamp(0, 1)
        expected = msssim_by_definition(x[0].double().numpy(), y[0].double().numpy(), n)
        assert tenerv.msssim(x, y).item() == pytest.approx(expected, abs=1e-4), (H, W)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_matches_the_cpu(tmp_path):
    """One training step (4 frames, one batch) on CUDA (bf16 autocast, channels-last activations,
    fused Adam) against the same step on the CPU in float32, from the same initial weights."""
    frames = sample_frames(4, size=(40, 24))
    cfg = tenerv.size_model(TeNeRVConfig(n_frames=4, height=24, width=40, params=8000, strides=(2, 2), epochs=1,
                                         batch_size=4))
    torch.manual_seed(cfg.seed)
    start = dict(tenerv.TeNeRV(cfg).named_parameters())  # what train() starts from: same seed, built on the CPU
    loss, step = {}, {}
    for device in ("cpu", "cuda"):
        model, state = tenerv.train(cfg, frames, str(tmp_path / device), torch.device(device), log=lambda *a: None)
        assert state["epoch"] == 1 and model.stage == 2
        loss[device] = state["history"][0]["loss"]
        # what the step moved (the stage switch after it copied tensors along dim 0: broadcast)
        step[device] = torch.cat([(p.detach().cpu() - start[n]).flatten() for n, p in model.named_parameters()])
    assert np.isfinite(loss["cuda"]) and loss["cuda"] == pytest.approx(loss["cpu"], rel=0.02)  # bf16 forward
    # Adam's first step moves each weight by about lr * sign(gradient): the same directions on both
    moved = step["cpu"].abs() > 0.5 * cfg.lr
    assert moved.float().mean() > 0.5
    same = (step["cpu"].sign() == step["cuda"].sign())[moved].float().mean()
    assert same > 0.9, same


def test_v4_and_v5_differ_at_the_papers_length_under_the_same_gop_cap():
    """600 frames of 1080p at 3M (the paper's setting): V5 splits the full model's K equally, V4 uses
    GoPs of a fixed power-of-two length; both stay under the full model's GoP cap."""
    base = dict(n_frames=600, height=1080, width=1920, params=3_000_000)
    full, v4, v5 = (tenerv.size_model(TeNeRVConfig(**base, ablation=a)) for a in ("", "V4", "V5"))
    assert v5.gops == full.gops and v4.gops <= full.gops
    b4, b5 = tenerv.fixed_length_gops(600, v4.gops), tenerv.equal_gops(600, v5.gops)
    assert b4 != b5 and len(b4) == v4.gops - 1 and len(b5) == v5.gops - 1
    assert len(set(b - a for a, b in zip([0] + b4, b4))) == 1  # V4: every GoP but the last is L frames


def test_stage_switch_uses_each_variants_rule(tmp_path):
    frames = sample_frames(10)
    for ablation, expect in (("V4", [8]), ("V5", [5])):
        cfg = tenerv.size_model(TeNeRVConfig(n_frames=10, height=36, width=64, params=20_000, strides=(2, 2), gops=2,
                                             epochs=2, ablation=ablation, checkpoint_seconds=1e9))
        _, state = tenerv.train(cfg, frames, str(tmp_path / ablation), torch.device("cpu"), log=lambda *a: None)
        assert state["boundaries"] == expect, (ablation, state["boundaries"])


def test_pretraining_length_is_its_own_setting():
    cfg = TeNeRVConfig(epochs=50, pretrain_epochs=60, l1_epochs=30)
    assert tenerv.stage1_epochs(cfg) == 10 and tenerv.l1_only_epochs(cfg) == 5
    assert tenerv.stage1_epochs(TeNeRVConfig(epochs=50)) == 5 and tenerv.l1_only_epochs(TeNeRVConfig(epochs=50)) == 0


def test_per_frame_windows_from_the_start_when_not_shared():
    m = tenerv.TeNeRV(tiny_cfg(shared_window=False))
    assert m.iff.weight.shape[0] == m.cfg.n_frames
    w = m.iff.weight.detach().clone()
    m.split_gops([4])
    assert torch.equal(m.iff.weight, w)  # nothing to copy at the switch


def test_frame_change_is_the_median_psnr_between_consecutive_frames():
    """A drift of 8 grey levels per frame is 30.0 dB between neighbours; a cut (a jump of 100 levels)
    does not move the median; one frame has no neighbour."""
    level = torch.arange(9) * 8 + 40
    expected = 10 * math.log10(255 ** 2 / 8 ** 2)

    def clip(levels):
        return levels.to(torch.uint8)[:, None, None, None].expand(len(levels), 3, 4, 6).clone()

    assert tenerv.frame_change(clip(level)) == pytest.approx(expected, abs=1e-4)
    level[5:] += 100  # a cut between frames 4 and 5: one pair of eight
    assert tenerv.frame_change(clip(level)) == pytest.approx(expected, abs=1e-4)
    assert tenerv.frame_change(clip(level[:1])) == math.inf


def test_patches_default_follows_the_frames(tmp_path):
    """--patches 0 (the default): 2 patches below FAST_MOTION_PSNR between consecutive frames, whole
    frames above; a value given is kept; a training run records the P it used."""
    cfg = tiny_cfg(epochs=2)
    assert cfg.patches == 0
    g = torch.Generator().manual_seed(0)
    still = torch.randint(0, 256, (1, 3, 24, 40), generator=g, dtype=torch.uint8).expand(8, 3, 24, 40).clone()
    still[1::2] ^= 1  # the lowest bit flips: consecutive frames 48 dB apart
    moving = torch.randint(0, 256, (8, 3, 24, 40), generator=g, dtype=torch.uint8)  # about 8 dB apart
    assert tenerv.frame_change(still) > tenerv.FAST_MOTION_PSNR > tenerv.frame_change(moving)
    assert tenerv.choose_patches(cfg, still) == 1 and tenerv.choose_patches(cfg, moving) == 2
    assert tenerv.choose_patches(replace(cfg, patches=1), moving) == 1
    assert tenerv.choose_patches(replace(cfg, patches=3), still) == 3
    _, state = tenerv.train(cfg, moving, str(tmp_path / "moving"), torch.device("cpu"), log=lambda *a: None)
    assert state["patches"] == 2
    _, state = tenerv.train(cfg, still, str(tmp_path / "still"), torch.device("cpu"), log=lambda *a: None)
    assert state["patches"] == 1
