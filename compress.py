"""
compress.py: a trained TeNeRV run -> a .tnrv file someone can send, and back to frames.

Sec. IV-D of the paper: "30 epochs of quantization-aware training followed by entropy coding".
N-bit QAT (N = 4..8, default 8) with a learned step per tensor and a straight-through estimator,
optional magnitude pruning and a rate term (below), a struct-packed bitstream with a CRC32 per
section, a built-in adaptive rANS coder (numpy, interleaved over lanes) with a zstd fallback,
and a decoder that needs only the file.

    python compress.py encode runs/bbb320_0.3M -o clip.tnrv
    python compress.py encode runs/bbb320_0.3M -o small.tnrv --bits 6 --prune 0.15 --lambda 0.01
    python compress.py decode clip.tnrv --out decoded/ --frames data/bbb320

Rate-aware QAT (our formulation; the T-NeRV supplement, App. A.7, trains with "distortion + λ rate"
but gives no entropy model): loss = distortion + λ · R, R the estimated size of the file's weights
in bits per pixel (bits / (T·H·W)), so λ means the same on any clip. The estimate is the size the
coder reaches, n · H per tensor (H the entropy of the tensor's histogram of quantized values), made
differentiable: each x = w / step adds 1 - f to the count of floor(x) and f to floor(x) + 1
(f = x - floor(x)), and R = -Σ h_k log2 p_k with p_k = (h~_k + 1/2) / (n + (2Q+1)/2) (the coder's
KT prior), h~ the histogram blurred by [1/4, 1/2, 1/4] so that emptying every other integer earns
nothing (rate_bits). Its gradient moves each value towards the more frequent of its two integers,
and, through the learned steps, trades coarser steps for fewer bits.

Bitstream format (version 2), all integers little-endian:

    magic        4 bytes  b"TNRV"
    version      u8       FORMAT_VERSION (2; version-1 files decode too: 8 bits, no bits field)
    n_sections   u8
    then n_sections sections, each
      tag        4 bytes  b"CONF", b"TENS", b"BIG_" or b"SMAL"
      coder      u8       0 raw, 1 zstd, 2 rANS (this file's coder)
      raw_len    u32      bytes of the decoded payload (symbols, for rANS)
      stored_len u32      bytes that follow
      crc32      u32      zlib.crc32 of the stored bytes
      payload    stored_len bytes

    CONF: n_frames u32, height u32, width u32, K u16, boundaries u32 x (K-1)
          (0-based first frames of GoPs 2..K), then the TeNeRVConfig as UTF-8 JSON
    TENS: n_tensors u16, then per tensor: name (u8 length + UTF-8), ndim u8, shape u32 x ndim,
          section u8 (0 BIG_, 1 SMAL), bits u8 (N, 4..8; not in version 1), n_scales u32,
          scales f16 x n_scales (one per tensor, or one per slice along dim 0), lo i8, hi i8
          (smallest and largest quantized value q, within +-(2^(N-1) - 1))
    BIG_, SMAL: the values q + 128 of the tensors assigned to them, one byte each, in TENS order;
          coded as a whole by rANS (see RANSCoder) or zstd, or stored raw.

The weight of element i of a tensor is q_i * scale (float16 scale, computed in float32), so a
decoder of the same version rebuilds bit-identical weights.
"""
import argparse
import json
import math
import os
import pathlib
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zstandard

import tenerv

MAGIC = b"TNRV"
FORMAT_VERSION = 2
QAT_EPOCHS = 30                   # Sec. IV-D
BITS = range(4, 9)                # the bit depths a file may hold (int8 storage, 4 bits and up)
ROWS_MIN = 256                    # per-slice scales only for slices of >= this many values
SMALL = 4096                      # tensors with fewer values go to the SMAL section
GRIDS = ("grids.", "gop_grid")    # the base and GoP grids (CompressConfig.bits_grids)
PRUNED = ("blocks.", "head.")     # where --prune acts: the weights of the convolutions (prune_masks)
RATE_PRIOR = 0.5                  # the rate estimate's pseudo-count per value: the coder's KT prior
CODERS = {0: "raw", 1: "zstd", 2: "rANS"}
MAGICS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip file or a PyTorch checkpoint",
          b"YUV4": "a .y4m video", b"\x28\xb5\x2f\xfd": "a zstd file"}  # what a wrong file may be, for the error


@dataclass
class CompressConfig:
    bits: int = 8             # N: weights are integers in [-(2^(N-1)-1), 2^(N-1)-1]; not in the paper (Sec. IV-D names QAT, not N)
    bits_grids: int = 0       # N of the base and GoP grids alone; 0: the same as bits
    prune: float = 0.0        # fraction of each convolution weight's smallest |values| set to 0 (HiNeRV's pruning)
    prune_epochs: int = 0     # epochs of float fine-tuning with the pruning mask, before QAT
    lmbda: float = 0.0        # λ (--lambda): QAT loss = distortion + λ · estimated rate in bits per pixel


class FormatError(ValueError):
    """A .tnrv file that cannot be decoded (truncated, corrupted, wrong magic, newer version)."""


def check_config(cc):
    """Every CompressConfig field in range, with the flag to fix."""
    if cc.bits not in BITS:
        raise ValueError(f"--bits {cc.bits}: expected {BITS.start} to {BITS.stop - 1}")
    if cc.bits_grids and cc.bits_grids not in BITS:
        raise ValueError(f"--bits-grids {cc.bits_grids}: expected {BITS.start} to {BITS.stop - 1}, or 0 (as --bits)")
    if not 0 <= cc.prune < 1:
        raise ValueError(f"--prune {cc.prune}: expected a fraction in [0, 1), e.g. 0.15")
    if cc.prune_epochs < 0 or (cc.prune_epochs and not cc.prune):
        raise ValueError(f"--prune-epochs {cc.prune_epochs}: expected 0 or more epochs, and only with --prune")
    if not cc.lmbda >= 0:  # also NaN
        raise ValueError(f"--lambda {cc.lmbda}: expected 0 or more (e.g. 0.01, 0.1)")


def pipeline_text(cc):
    """'8-bit', or e.g. '6-bit (grids 5), 15% pruned, λ 0.01'."""
    return (f"{cc.bits}-bit" + (f" (grids {cc.bits_grids})" if cc.bits_grids and cc.bits_grids != cc.bits else "")
            + (f", {100 * cc.prune:g}% pruned" if cc.prune else "") + (f", λ {cc.lmbda:g}" if cc.lmbda else ""))


def tensor_bits(name, cc):
    """N of one tensor: bits_grids for the grids where set, bits elsewhere."""
    return cc.bits_grids if cc.bits_grids and name.startswith(GRIDS) else cc.bits


# -----------------------------------------------------------------------------
# N-bit quantization (per tensor, or per slice along dim 0 where slices are large)

def qmax(bits):
    return 2 ** (bits - 1) - 1  # symmetric: q in [-qmax, qmax], e.g. [-127, 127] at 8 bits


def n_scales(shape):
    numel = math.prod(shape)
    return shape[0] if len(shape) >= 2 and numel // shape[0] >= ROWS_MIN else 1


def quantize(w, bits=8, scale=None):
    """w -> (q int8, scale float16): w ~ q * scale, |q| <= qmax(bits). Not in the paper: symmetric, with a
    float16 scale per tensor or per slice along dim 0 (n_scales), by default largest |w| / qmax (QAT learns its own)."""
    Q = qmax(bits)
    rows = w.detach().float().reshape(n_scales(w.shape), -1)
    if scale is None:
        # the floor after the float16 rounding, which turns anything below 2^-25 into 0 (then 0 / 0)
        scale = (rows.abs().amax(1) / Q).half().clamp_min(2 ** -24)  # 2^-24: float16's smallest step
    q = torch.clamp(torch.round(rows / scale.float()[:, None]), -Q, Q).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize(q, scale):
    rows = q.float().reshape(len(scale), -1)
    return (rows * scale.float()[:, None]).reshape(q.shape)


def stored_step(log_step):
    """exp(log_step) as the float16 the file stores, straight-through for the gradient."""
    step = log_step.exp()
    return step + (step.half().clamp_min(2 ** -24).float() - step).detach()


def fake_quantize(w, log_step, bits):
    """(the weights the file will hold, x = w / step clamped to +-qmax). Forward: step * round(x);
    backward: a straight-through round, so w gets the gradient inside the range and the step
    gets round(x) - x (or +-qmax where clamped): LSQ (Esser et al. 2020), not in the paper."""
    Q = qmax(bits)
    step = stored_step(log_step)[:, None]
    x = (w.reshape(len(step), -1) / step).clamp(-Q, Q)
    q = x + (x.round() - x).detach()
    return (q * step).reshape(w.shape), x


def quantized_state(model, cc=None, steps=None):
    """name -> (q, scale, bits) of every parameter, at cc's bit depths, with the steps QAT learned
    (else largest |w| / qmax)."""
    cc = cc or CompressConfig()
    out = {}
    for name, p in model.named_parameters():
        bits = tensor_bits(name, cc)
        out[name] = (*quantize(p, bits, None if steps is None else steps[name]), bits)
    return out


def to_symbols(q):
    """int8 tensor -> its values + 128 as a flat uint8 array (the coders' alphabet; at N bits only
    128 +- qmax(N) occur, and the coder's tables cover each tensor's own range)."""
    return (q.reshape(-1).numpy().astype(np.int16) + 128).astype(np.uint8)


def rate_bits(xs, bits, smooth=True):
    """Differentiable estimate of the coded size in bits of tensors whose rounded x are the stored
    q (see the module docstring): per tensor, -sum_k h_k log2 p_k, h the soft histogram of x and p
    the KT-smoothed probabilities of h itself (smooth=False: the size of a file, n · H at integer x)
    or of h blurred by [1/4, 1/2, 1/4] (smooth, what QAT descends). Without the blur, emptying every
    other value of a tensor halves its probabilities' count and looks like a bit saved per value;
    QAT at 8 bits then builds such combs (a worse quantizer than a coarser step, and slower for the
    coder to learn). Measured, 10 QAT epochs, λ 0.1: 8-bit 0.444 -> 0.412 bpp at 29.74 dB; 6-bit
    level (0.349 bpp 29.55 dB, 0.360 bpp 29.57 dB)."""
    sizes = [x.numel() for x in xs]
    Q = torch.tensor([qmax(b) for b in bits], device=xs[0].device)
    width = 2 * Q + 1                                             # values -Q..Q per tensor
    first = torch.cumsum(width, 0) - width                        # where each tensor's bins start
    per = lambda v: v.repeat_interleave(torch.tensor(sizes, device=v.device))  # noqa: E731  per value
    u = torch.cat([x.reshape(-1) for x in xs]) + per(Q)           # in [0, 2Q]
    i = torch.minimum(u.detach().floor(), per(2 * Q - 1))         # the bin below (x = +Q: the bin below it, f = 1)
    f = u - i
    bin_ = (i.long() + per(first))
    h = torch.zeros(int(width.sum()), device=u.device).index_add(0, bin_, 1 - f).index_add(0, bin_ + 1, f)
    model = h
    if smooth:  # each bin gives a quarter to each neighbour of its tensor (its own at the ends)
        edge = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        edge[first] = True                                        # a tensor's first bin
        left = torch.where(edge, h, h.roll(1))
        right = torch.where(edge.roll(-1), h, h.roll(-1))         # a tensor's last bin: the next one's first
        model = (left + 2 * h + right) / 4
    n = torch.tensor(sizes, device=u.device, dtype=h.dtype).repeat_interleave(width)
    p = (model + RATE_PRIOR) / (n + RATE_PRIOR * width.repeat_interleave(width))
    return -(h * p.log2()).sum()


# -----------------------------------------------------------------------------
# Pruning (not in the paper; HiNeRV's magnitude pruning)

def prune_masks(model, fraction):
    """name -> bool mask of the values kept: in every convolution weight (pointwise, depthwise, the
    upsampling projections, the head) the `fraction` of smallest |w| is dropped. Like HiNeRV, which
    prunes conv/linear weights only: the grids, IFF windows, biases and LayerNorms are the few
    values each frame or channel depends on alone, and a zero there is a wrong feature, not a
    small one."""
    masks = {}
    for name, p in model.named_parameters():
        if fraction and name.startswith(PRUNED) and name.endswith(".weight") and p.dim() >= 2:
            mask = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
            mask[p.detach().abs().reshape(-1).argsort()[: int(fraction * p.numel())]] = False
            masks[name] = mask.reshape(p.shape)
    return masks


def apply_masks(model, masks):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])


# -----------------------------------------------------------------------------
# Quantization-aware training (Sec. IV-D), rate-aware with cc.lmbda > 0

def qat(model, frames, epochs, device, cc=None, masks=None, lr_scale=0.1, log=print, float_weights=False):
    """Fine-tune `model` for `epochs`; returns name -> float16 step of each tensor.

    The loss sees the model the file will hold: every tensor fake-quantized to tensor_bits(name, cc)
    with a learned step (initialised to largest |w| / qmax), plus cc.lmbda times the estimated rate
    in bits per pixel; Adam moves the floats and the steps. Pruned values (masks) stay 0. With
    float_weights, plain fine-tuning instead (the epochs after pruning), and None is returned.
    """
    cfg, masks = model.cfg, masks or {}
    cc = None if float_weights else cc or CompressConfig()
    params = dict(model.named_parameters())
    bits = {n: tensor_bits(n, cc) for n in params} if cc else {}
    log_steps = {n: quantize(p, bits[n])[1].float().log().to(device).requires_grad_() for n, p in params.items()} if cc else {}
    optimizer = torch.optim.Adam([*params.values(), *log_steps.values()], lr=0.0)
    frames_dev = frames.to(device)
    T = cfg.n_frames
    pixels = T * cfg.height * cfg.width
    n_batches = math.ceil(T / cfg.batch_size)
    n_steps = max(1, epochs * n_batches)
    step = 0
    apply_masks(model, masks)
    model.train()
    progress = tenerv.Progress(epochs, log)
    what = f"QAT {cc.bits}-bit" if cc else "fine-tuning"

    def quantized():
        """(weights, x per tensor) of the model the file would hold (the floats without cc)."""
        if not cc:
            return params, None
        pairs = {n: fake_quantize(p, log_steps[n], bits[n]) for n, p in params.items()}
        return {n: w for n, (w, _) in pairs.items()}, [x for _, x in pairs.values()]

    def rate_text():
        with torch.no_grad():
            return f"{what} (rate {rate_bits(quantized()[1], list(bits.values()), False).item() / pixels:.4f} bpp)" if cc else what

    try:
        for epoch in range(epochs):
            order = torch.randperm(T, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
            # on the device: no GPU sync per step
            tot_loss, tot_psnr = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
            for j, t in enumerate(order.split(cfg.batch_size)):
                # not in the paper: QAT at a tenth of the training learning rate, cosine to 0
                lr = cfg.lr * lr_scale * 0.5 * (1 + math.cos(math.pi * step / n_steps))
                for g in optimizer.param_groups:
                    g["lr"] = lr
                t = t.to(device)
                target = frames_dev[t].float() / 255
                weights, xs = quantized()
                out = torch.func.functional_call(model, weights, (t,))
                loss = tenerv.distortion(out, target, cfg)
                if cc and cc.lmbda:
                    loss = loss + cc.lmbda * rate_bits(xs, list(bits.values())) / pixels
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                apply_masks(model, masks)
                tot_loss += loss.detach() * len(t)
                tot_psnr += tenerv.psnr(out.detach().clamp(0, 1), target).sum()  # of the quantized model
                step += 1
                if progress.due():
                    n = j * cfg.batch_size + len(t)
                    progress.update(epoch, j + 1, n_batches, tot_loss.item() / n, tot_psnr.item() / n, what)
            progress.update(epoch, n_batches, n_batches, tot_loss.item() / T, tot_psnr.item() / T, rate_text(),
                            final=not progress.tty or epoch + 1 == epochs)
    except KeyboardInterrupt:
        progress.end_line()
        raise
    return {n: stored_step(s).detach().cpu().half() for n, s in log_steps.items()} if cc else None


# -----------------------------------------------------------------------------
# rANS: interleaved over lanes, adaptive per block

class RANSCoder:
    """Range-asymmetric numeral system (Duda 2013), 32-bit states, 16-bit renormalisation.

    Why rANS: the state update is a handful of integer ops that vectorise over independent
    lanes in numpy, which gives tens of millions of symbols/s without compiled code.

    Adaptivity, with no histogram header: each tensor (a context) is coded in 17 blocks,
    covering the fractions [0, 2^-8), [2^-8, 2^-7.5), ..., [2^-0.5, 1) of its values. A block is
    coded with frequencies from what the decoder already has: the tensor's counts in its earlier
    blocks, plus a prior of POOLED pseudo-counts per value of the tensor's [lo, hi] range, shaped
    like the counts of every tensor of the section so far (each + 1/2, the KT estimator). Each
    tensor is scaled to its own range, so their histograms are alike, and the prior lets a tensor
    start from the others' histogram rather than a flat one: what small tensors (SMAL) and the
    first blocks of large ones pay for learning their own drops by about a third (not in the paper;
    measured in docs/compression.md). Blocks are laid out one after another for all tensors; each
    is padded to a whole number of lane steps with a pad symbol of probability 1, which costs no
    bits.
    """

    PROB_BITS = 16
    M = 1 << PROB_BITS
    L_STATE = 1 << 16                       # states live in [2^16, 2^32)
    FRACTIONS = [0.0] + [2.0 ** (-k / 2) for k in range(16, 0, -1)] + [1.0]  # 17 blocks, each ~1.4x the last
    POOLED = 4.0                            # prior pseudo-counts per value of a range (measured: 2-8 all close)

    FRACTIONS_V1 = [0.0] + [2.0 ** -k for k in range(8, 0, -1)] + [1.0]  # version 1: 9 blocks, a flat prior

    def __init__(self, sizes, ranges, version=FORMAT_VERSION):
        """sizes: values per context; ranges: (lo, hi) symbol range per context (0..255); version:
        the file format's (version 1 files were coded with 9 blocks and a flat KT prior)."""
        self.sizes, self.ranges, self.version = list(sizes), list(ranges), version
        n = sum(self.sizes)
        # each lane costs 4 bytes of final state and each step ~15 us: from 2^18 symbols on, ~1024
        # steps of up to 256 lanes (~15M symbols/s); below, where the speed is out of reach anyway,
        # ~2048 steps (half the lanes). Version 1: ~1024 steps of up to 1024 lanes.
        per_lane = 1024 if version == 1 or n >= 2 ** 18 else 2048
        self.lanes = int(min(1024 if version == 1 else 256, max(16, 2 ** round(math.log2(max(n, 1) / per_lane)))))
        self.n_ctx = len(self.sizes)
        # the layout: per block, per context, the slice [a, b) of that context's values
        self.blocks = []
        fractions = self.FRACTIONS_V1 if version == 1 else self.FRACTIONS
        for f0, f1 in zip(fractions, fractions[1:]):
            self.blocks.append([(j, int(f0 * s), int(f1 * s)) for j, s in enumerate(self.sizes)])
        self.in_range = np.zeros((self.n_ctx, 256), bool)
        for j, (lo, hi) in enumerate(self.ranges):
            self.in_range[j, lo: hi + 1] = True

    def tables(self, counts):
        """Frequencies summing to M per context (>= 1 inside [lo, hi]) and cumulative ones.

        Row n_ctx is the pad context: one symbol of probability 1.
        """
        n_in = self.in_range.sum(1, keepdims=True)
        if self.version == 1:
            p = np.where(self.in_range, counts + 0.5, 0.0)
        else:
            pooled = np.where(self.in_range, counts.sum(0) + 0.5, 0.0)  # the section's histogram so far, per range
            p = counts * self.in_range + self.POOLED * n_in * pooled / pooled.sum(1, keepdims=True)
        p /= p.sum(1, keepdims=True)
        freq = np.where(self.in_range, 1 + np.floor(p * (self.M - n_in)), 0).astype(np.int64)
        freq[np.arange(self.n_ctx), freq.argmax(1)] += self.M - freq.sum(1)
        pad = np.zeros((1, 256), np.int64)
        pad[0, 0] = self.M
        freq = np.concatenate([freq, pad])
        cum = np.cumsum(freq, 1) - freq
        return freq.astype(np.uint32), cum.astype(np.uint32)

    def _layout(self):
        """Per block: the context of every slot (n_ctx = pad) and where each value comes from."""
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        out = []
        for block in self.blocks:
            lens = np.array([b - a for _, a, b in block], np.int64)
            ctx = np.repeat(np.arange(self.n_ctx), lens)
            starts = np.array([offsets[j] + a for j, a, _ in block], np.int64)
            # src: for each slot, its index in the concatenated values (a run per context)
            src = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
            pad = (-len(ctx)) % self.lanes
            out.append((np.concatenate([ctx, np.full(pad, self.n_ctx)]), src))
        return out

    def _count(self, counts, ctx, s):
        counts += np.bincount(ctx * 256 + s, minlength=self.n_ctx * 256).reshape(self.n_ctx, 256)

    def encode(self, symbols):
        """symbols: uint8 array, the contexts' values one after another -> bytes."""
        symbols = np.asarray(symbols, np.uint8)
        L = self.lanes
        counts = np.zeros((self.n_ctx, 256))
        per_block = []
        for ctx, src in self._layout():  # forward: the tables the decoder will see
            freq, cum = self.tables(counts)
            s = np.zeros(len(ctx), np.int64)
            s[: len(src)] = symbols[src]
            per_block.append((freq[ctx, s].reshape(-1, L), cum[ctx, s].reshape(-1, L)))
            self._count(counts, ctx[: len(src)], s[: len(src)])
        x = np.full(L, self.L_STATE, np.uint32)
        chunks = []
        for f, c in reversed(per_block):  # rANS encodes backwards
            for i in range(len(f) - 1, -1, -1):
                fi = f[i]
                emit = np.flatnonzero((x >> 16) >= fi)  # x >= f * 2^16 would overflow 32 bits for the pad
                chunks.append(x.take(emit).astype(np.uint16))  # the low 16 bits
                x[emit] >>= 16
                q, r = np.divmod(x, fi)
                x = (q << 16) + r + c[i]
        words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
        return x.astype("<u4").tobytes() + words.astype("<u2").tobytes()

    def decode(self, data, n_symbols):
        L = self.lanes
        if len(data) < 4 * L or (len(data) - 4 * L) % 2:
            raise FormatError("rANS stream is truncated")
        x = np.frombuffer(data[: 4 * L], "<u4").astype(np.uint32)
        words = np.frombuffer(data[4 * L:], "<u2").astype(np.uint32)
        pos = 0
        out = np.zeros(n_symbols, np.uint8)
        counts = np.zeros((self.n_ctx, 256))
        # k = context * 256 + symbol indexes the flat tables; the inverse table maps
        # context * M + slot -> k, so one take finds both symbol and table row
        k_type = np.uint16 if (self.n_ctx + 1) * 256 <= 1 << 16 else np.uint32
        keys = np.arange((self.n_ctx + 1) * 256, dtype=k_type)
        for ctx, src in self._layout():
            freq, cum = self.tables(counts)
            inv = np.repeat(keys, freq.ravel())
            freq, cum = freq.ravel(), cum.ravel()
            ctx_steps = ctx.reshape(-1, L)
            row_inv = ctx_steps.astype(np.int64) * self.M  # row offsets, once per block
            decoded = np.zeros(ctx_steps.shape, k_type)
            for i in range(len(ctx_steps)):  # flat 1-D takes: cheaper than 2-D fancy indexing
                slot = x & 0xFFFF
                k = inv.take(row_inv[i] + slot)
                x = freq.take(k) * (x >> 16) + slot - cum.take(k)
                need = np.flatnonzero(x < self.L_STATE)
                if pos + len(need) > len(words):
                    raise FormatError("rANS stream is truncated")
                x[need] = (x.take(need) << 16) | words[pos: pos + len(need)]
                pos += len(need)
                decoded[i] = k
            vals = (decoded.ravel()[: len(src)] & 0xFF).astype(np.uint8)
            out[src] = vals
            self._count(counts, ctx[: len(src)], vals.astype(np.int64))
        if pos != len(words) or not np.all(x == self.L_STATE):
            raise FormatError("rANS stream is corrupted (it does not end where it should)")
        return out


def rans_coder(values_per_ctx):
    """The coder for a list of uint8 arrays, one context each (their sizes and ranges travel in TENS)."""
    return RANSCoder([len(v) for v in values_per_ctx], [symbol_range(v) for v in values_per_ctx])


def rans_encode(values_per_ctx):
    """List of uint8 arrays -> bytes."""
    return rans_coder(values_per_ctx).encode(np.concatenate(values_per_ctx) if values_per_ctx else np.zeros(0, np.uint8))


def symbol_range(v):
    return (int(v.min()), int(v.max())) if len(v) else (0, 0)


def entropy_bytes(values_per_ctx):
    """Sum over contexts of n * H0 / 8: the zeroth-order entropy the coder is measured against."""
    total = 0.0
    for v in values_per_ctx:
        if len(v):
            p = np.bincount(v, minlength=256) / len(v)
            p = p[p > 0]
            total += -len(v) * (p * np.log2(p)).sum() / 8
    return total


# -----------------------------------------------------------------------------
# Bitstream: sections with a CRC32 each

SECTION = struct.Struct("<4sBIII")  # tag, coder, raw_len, stored_len, crc32
HEAD = struct.Struct("<4sBB")       # magic, version, n_sections


def write_section(tag, coder, raw_len, stored):
    return SECTION.pack(tag, coder, raw_len, len(stored), zlib.crc32(stored)) + stored


def smallest(raw, force=None):
    """(coder id, stored bytes): raw or zstd, whichever is smaller (or the one forced)."""
    z = zstandard.ZstdCompressor(level=19).compress(raw)
    if force == "zstd" or (force is None and len(z) < len(raw)):
        return 1, z
    return 0, raw


def tag_name(tag):
    """A section tag for people: BIG_ as it is, unprintable bytes (a damaged file) in hex."""
    return tag.decode() if all(32 < b < 127 for b in tag) else tag.hex(" ").upper()


def shape_text(shape):
    return "x".join(map(str, shape))


def video_text(shape):
    """(T, 3, H, W) -> '16 frames of 320x180'."""
    return f"{tenerv.plural(shape[0], 'frame')} of {shape[-1]}x{shape[-2]}"


def read_sections(data):
    if len(data) < HEAD.size:
        raise FormatError(f"truncated: {len(data)} bytes is shorter than the {HEAD.size}-byte file header")
    magic, version, n = HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        guess = next((f" ({what}?)" for m, what in MAGICS.items() if data.startswith(m)), "")
        raise FormatError(f"not a TeNeRV file: it starts with {magic.hex(' ').upper()}{guess}, not {MAGIC.decode()}")
    if version > FORMAT_VERSION:
        raise FormatError(f"file format version {version} is newer than this decoder ({FORMAT_VERSION}); update compress.py")
    if version < 1:
        raise FormatError(f"unknown file format version {version}")
    pos, sections = HEAD.size, {}
    for _ in range(n):
        if pos + SECTION.size > len(data):
            raise FormatError(f"truncated: section header at byte {pos} runs past the end ({len(data)} bytes)")
        tag, coder, raw_len, stored_len, crc = SECTION.unpack_from(data, pos)
        pos += SECTION.size
        if pos + stored_len > len(data):
            raise FormatError(f"truncated: section {tag_name(tag)} needs {stored_len} bytes, {len(data) - pos} remain")
        stored = data[pos: pos + stored_len]
        pos += stored_len
        if zlib.crc32(stored) != crc:
            raise FormatError(f"corrupted: section {tag_name(tag)} fails its CRC32 check")
        if coder not in CODERS:
            raise FormatError(f"corrupted: section {tag_name(tag)} names unknown coder {coder}")
        sections[tag] = (coder, raw_len, stored)
    if pos != len(data):
        raise FormatError(f"corrupted: {len(data) - pos} unexpected bytes after the last section")
    for tag in (b"CONF", b"TENS", b"BIG_", b"SMAL"):
        if tag not in sections:
            raise FormatError(f"corrupted: section {tag_name(tag)} is missing")
    return sections


def unpack_plain(coder, raw_len, stored, what):
    if coder == 0:
        raw = stored
    elif coder == 1:
        try:
            raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=max(raw_len, 1))
        except zstandard.ZstdError as e:
            raise FormatError(f"corrupted: {what} does not decompress ({e})") from None
    else:
        raise FormatError(f"corrupted: {what} cannot use coder {CODERS[coder]}")
    if len(raw) != raw_len:
        raise FormatError(f"corrupted: {what} has {len(raw)} bytes, the header says {raw_len}")
    return raw


def encode_model(model, boundaries, coder="auto", cc=None, steps=None):
    """Quantize every parameter (cc's bit depths; QAT's steps, else largest |w| / qmax) and write the
    file's bytes; returns (bytes, report)."""
    cfg = model.cfg
    qs = quantized_state(model, cc, steps)
    names = list(qs)
    # CONF
    conf = struct.pack(f"<IIIH{len(boundaries)}I", cfg.n_frames, cfg.height, cfg.width, len(boundaries) + 1, *boundaries)
    conf += json.dumps(asdict(cfg)).encode()
    # TENS
    tens = struct.pack("<H", len(names))
    values = {0: [], 1: []}
    for name in names:
        q, scale, bits = qs[name]
        v = to_symbols(q)
        where = 1 if q.numel() < SMALL else 0
        values[where].append(v)
        lo, hi = symbol_range(v)
        nb = name.encode()
        tens += struct.pack(f"<B{len(nb)}sB{q.dim()}IBBI", len(nb), nb, q.dim(), *q.shape, where, bits, len(scale))
        tens += scale.numpy().astype("<f2").tobytes() + struct.pack("<bb", lo - 128, hi - 128)
    out = [write_section(b"CONF", *_plain(conf, coder)), write_section(b"TENS", *_plain(tens, coder))]
    report = dict(sections={})
    for tag, key in ((b"BIG_", 0), (b"SMAL", 1)):
        raw = np.concatenate(values[key]).tobytes() if values[key] else b""
        c, stored = smallest(raw, "zstd" if coder == "zstd" else None)
        info = dict(symbols=len(raw), entropy_bytes=entropy_bytes(values[key]), zstd_or_raw_bytes=len(stored))
        if coder != "zstd" and values[key]:
            t0 = time.perf_counter()
            r = rans_encode(values[key])
            t1 = time.perf_counter()
            rans_coder(values[key]).decode(r, len(raw))
            t2 = time.perf_counter()
            info.update(rans_bytes=len(r), rans_encode_msym_s=len(raw) / (t1 - t0) / 1e6,
                        rans_decode_msym_s=len(raw) / (t2 - t1) / 1e6)
            if len(r) < len(stored):
                c, stored = 2, r
        out.append(write_section(tag, c, len(raw), stored))
        report["sections"][tag.decode()] = dict(coder=CODERS[c], bytes=len(stored) + SECTION.size, **info)
    for tag, b in ((b"CONF", out[0]), (b"TENS", out[1])):
        report["sections"][tag.decode()] = dict(coder=CODERS[b[4]], bytes=len(b))
    data = HEAD.pack(MAGIC, FORMAT_VERSION, len(out)) + b"".join(out)
    report["shares"] = component_shares(qs, values, data, report)
    with torch.no_grad():  # what QAT's rate term says of these values (integers: the plain histograms)
        report["rate_estimate_bits"] = rate_bits([q.float() for q, *_ in qs.values()], [b for *_, b in qs.values()],
                                                 smooth=False).item()
    return data, report


def _plain(raw, coder):
    c, stored = smallest(raw, "zstd" if coder == "zstd" else None)
    return c, len(raw), stored


def read_tensors(data):
    """Bytes of a .tnrv file -> (config, boundaries, tensors): per tensor (name, shape, bits, scale,
    symbols), each checked against its header fields, not yet against a model."""
    sections, version = read_sections(data), data[4]  # read_sections checked the version
    conf = unpack_plain(*sections[b"CONF"], "section CONF")
    tens = unpack_plain(*sections[b"TENS"], "section TENS")
    try:
        T, H, W, K = struct.unpack_from("<IIIH", conf, 0)
        boundaries = list(struct.unpack_from(f"<{K - 1}I", conf, 14))
        cfg = tenerv.config_from_dict(json.loads(conf[14 + 4 * (K - 1):].decode()))
        entries, pos = [], 2
        (n,) = struct.unpack_from("<H", tens, 0)
        for _ in range(n):
            (ln,) = struct.unpack_from("<B", tens, pos)
            name = tens[pos + 1: pos + 1 + ln].decode()
            pos += 1 + ln
            (nd,) = struct.unpack_from("<B", tens, pos)
            shape = struct.unpack_from(f"<{nd}I", tens, pos + 1)
            pos += 1 + 4 * nd
            if version == 1:  # no bits field: 8 bits
                (where, ns), bits = struct.unpack_from("<BI", tens, pos), 8
                pos += 5
            else:
                where, bits, ns = struct.unpack_from("<BBI", tens, pos)
                pos += 6
            scale = np.frombuffer(tens, "<f2", ns, pos).copy()
            lo, hi = struct.unpack_from("<bb", tens, pos + 2 * ns)
            pos += 2 * ns + 2
            entries.append((name, shape, where, bits, scale, lo, hi))
    except (struct.error, UnicodeDecodeError, ValueError, TypeError) as e:
        raise FormatError(f"corrupted: the header sections do not parse ({e.__class__.__name__})") from None
    if pos != len(tens):
        raise FormatError(f"corrupted: section TENS has {len(tens) - pos} bytes after its {n} tensors")
    if (cfg.n_frames, cfg.height, cfg.width, cfg.gops) != (T, H, W, K):
        raise FormatError("corrupted: the frame count, size or GoP count disagree with the configuration")
    if boundaries != sorted(set(boundaries)) or not all(0 < b < T for b in boundaries):
        raise FormatError(f"corrupted: GoP boundaries {boundaries} are not increasing frames between 1 and {T - 1}")
    for name, shape, where, bits, scale, lo, hi in entries:
        if bits not in BITS:
            raise FormatError(f"corrupted: tensor {name} has {bits} bits, expected {BITS.start} to {BITS.stop - 1}")
        if not -qmax(bits) <= lo <= hi <= qmax(bits):
            raise FormatError(f"corrupted: tensor {name} says its values run from {lo} to {hi}, which is not a range "
                              f"within +-{qmax(bits)} ({bits} bits)")
        if where not in (0, 1):
            raise FormatError(f"corrupted: tensor {name} is in section {where}, expected 0 (BIG_) or 1 (SMAL)")
    tensors = []
    for key, tag in ((0, b"BIG_"), (1, b"SMAL")):
        mine = [e for e in entries if e[2] == key]
        coder, raw_len, stored = sections[tag]
        sizes = [math.prod(e[1]) for e in mine]
        if raw_len != sum(sizes):
            raise FormatError(f"corrupted: section {tag_name(tag)} holds {raw_len} values, the tensors need {sum(sizes)}")
        if coder == 2:
            sym = RANSCoder(sizes, [(lo + 128, hi + 128) for *_, lo, hi in mine], version).decode(stored, raw_len)
        else:
            sym = np.frombuffer(unpack_plain(coder, raw_len, stored, f"section {tag_name(tag)}"), np.uint8)
        for (name, shape, _, bits, scale, lo, hi), v in zip(mine, np.split(sym, np.cumsum(sizes)[:-1]) if mine else []):
            if len(v) and not lo + 128 <= v.min() <= v.max() <= hi + 128:  # rANS cannot leave the range, raw and zstd can
                raise FormatError(f"corrupted: tensor {name} holds values outside its range {lo} to {hi}")
            tensors.append((name, shape, bits, scale, v))
    order = {e[0]: i for i, e in enumerate(entries)}
    return cfg, boundaries, sorted(tensors, key=lambda t: order[t[0]])


def decode_model(data, device="cpu"):
    """Bytes of a .tnrv file -> (model with the dequantized weights, boundaries)."""
    cfg, boundaries, tensors = read_tensors(data)
    try:  # a configuration that parses but builds no model (a field of the wrong type or length)
        model = tenerv.TeNeRV(cfg, stage=1)
        model.split_gops(boundaries)
    except (TypeError, ValueError, IndexError) as e:
        raise FormatError(f"corrupted: the configuration does not build a model ({e.__class__.__name__})") from None
    expected = dict(model.named_parameters())
    state = {}
    for name, shape, bits, scale, v in tensors:
        if name not in expected:
            raise FormatError(f"corrupted: tensor {name} does not fit the model (it has no such tensor)")
        want = expected[name].shape
        if tuple(want) != tuple(shape) or len(scale) != n_scales(shape):
            raise FormatError(f"corrupted: tensor {name} of {shape_text(shape)} with {len(scale)} scales does not fit "
                              f"the model ({shape_text(want)} with {n_scales(want)})")
        q = torch.from_numpy(v.astype(np.int16) - 128).to(torch.int8).reshape(shape)
        state[name] = dequantize(q, torch.from_numpy(scale))
    if set(state) != set(expected):
        raise FormatError("corrupted: the file does not hold every tensor of the model")
    model.load_state_dict(state, strict=False)
    return model.to(device), boundaries


# -----------------------------------------------------------------------------
# Reports

COMPONENTS = (("grids", ("grids.",)), ("iff", ("iff.",)), ("gop_grids", ("gop_grid",)), ("depthwise", (".dw.",)),
              ("norm", (".norm.",)), ("pointwise", (".proj.", ".pw1.", ".pw2.")), ("head", ("head.",)))


def component_of(name):
    for comp, keys in COMPONENTS:
        if any(k in name if k.startswith(".") else name.startswith(k) for k in keys):
            return comp
    raise KeyError(name)


def component_shares(qs, values, data, report):
    """Bytes per component: each section's bytes split in proportion to the entropy of its tensors."""
    shares = {c: 0.0 for c, _ in COMPONENTS}
    shares["header"] = report["sections"]["CONF"]["bytes"] + report["sections"]["TENS"]["bytes"] + HEAD.size
    names = {0: [n for n, (q, *_) in qs.items() if q.numel() >= SMALL], 1: [n for n, (q, *_) in qs.items() if q.numel() < SMALL]}
    for key, tag in ((0, "BIG_"), (1, "SMAL")):
        if not values[key]:  # an empty section is only its header
            shares["header"] += report["sections"][tag]["bytes"]
        ent = [max(entropy_bytes([v]), 1e-9) for v in values[key]]
        for name, e in zip(names[key], ent):
            shares[component_of(name)] += report["sections"][tag]["bytes"] * e / sum(ent)
    return {k: v / len(data) for k, v in shares.items()}


def write_bytes_atomic(data, path):
    tenerv.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def metrics_against(model, frames, device):
    p, m, fps, recon = tenerv.evaluate(model, frames, device)
    return p.mean().item(), m, fps, recon


# -----------------------------------------------------------------------------
# Command line

def encode_run(run, output, qat_epochs=QAT_EPOCHS, coder="auto", frames_path=None, size=None, json_path=None,
               device="auto", log=print, matrix=None, cc=None):
    """Pruning (cc.prune), QAT of a finished tenerv.py run at cc's bit depths and λ, then the .tnrv
    file; returns (and writes to JSON) the report. The frames are the run's (its metrics.json says
    where, and the size and matrix of a .yuv/.y4m) unless frames_path is given."""
    cc = cc or CompressConfig()
    check_config(cc)
    json_path = json_path or os.path.splitext(output)[0] + ".json"
    tenerv.check_writable(output, "-o", folder=False)  # now, not after the QAT epochs
    tenerv.check_writable(json_path, "--json", folder=False)
    ckpt = os.path.join(run, "ckpt.pt")
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"{ckpt}: not found; pass a run folder written by tenerv.py")
    device = torch.device("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")
    model, saved = tenerv.load_checkpoint(ckpt, device)
    if model.stage != 2 or saved["state"]["epoch"] < model.cfg.epochs:
        raise ValueError(f"{run}: training is not finished (epoch {saved['state']['epoch']}/{model.cfg.epochs}); "
                         f"finish it with tenerv.py --resume first")
    if frames_path is None:
        meta = os.path.join(run, "metrics.json")
        if os.path.exists(meta):
            m = json.loads(pathlib.Path(meta).read_text())
            frames_path, size, matrix = m.get("frames"), m.get("size"), matrix or m.get("matrix")
    if frames_path is None:
        raise ValueError(f"{run}: the run does not say where its frames are; pass --frames")
    frames = tenerv.load_frames(frames_path, size, matrix or tenerv.DEFAULT_MATRIX)
    cfg = model.cfg
    if tuple(frames.shape) != (cfg.n_frames, 3, cfg.height, cfg.width):
        raise ValueError(f"{frames_path}: {video_text(frames.shape)}, but the run was trained on "
                         f"{video_text((cfg.n_frames, 3, cfg.height, cfg.width))}")
    boundaries = saved["state"]["boundaries"]
    psnr_float = metrics_against(model, frames, device)[0]
    log(f"float model: PSNR {psnr_float:.2f} dB")
    torch.manual_seed(cfg.seed)
    masks = prune_masks(model, cc.prune)
    if masks:
        apply_masks(model, masks)
        n_pruned = sum(int((~m).sum()) for m in masks.values())
        log(f"pruned {n_pruned} of {sum(m.numel() for m in masks.values())} convolution weights "
            f"({tenerv.plural(len(masks), 'tensor')}): PSNR {metrics_against(model, frames, device)[0]:.2f} dB before fine-tuning")
        qat(model, frames, cc.prune_epochs, device, masks=masks, log=log, float_weights=True)
    steps = qat(model, frames, qat_epochs, device, cc, masks, log=log)
    psnr_float_after = metrics_against(model, frames, device)[0] if qat_epochs else psnr_float  # what quantizing costs now
    data, report = encode_model(model.cpu(), boundaries, coder, cc, steps)
    decoded, _ = decode_model(data)
    p, m, fps, _ = metrics_against(decoded, frames, torch.device("cpu"))
    T, H, W = cfg.n_frames, cfg.height, cfg.width
    result = dict(bytes=len(data), bpp=8 * len(data) / (T * H * W), psnr=p, msssim=m, psnr_float=psnr_float,
                  psnr_float_after=psnr_float_after,
                  qat_epochs=qat_epochs, coder=coder, **asdict(cc), rate_estimate_bpp=report["rate_estimate_bits"] / (T * H * W),
                  sections=report["sections"], shares=report["shares"],
                  msssim_scales=tenerv.msssim_scales(H, W))
    for tag, s in report["sections"].items():
        extra = (f" ({s['symbols']} symbols, entropy {s['entropy_bytes']:.0f} B, rANS {s['rans_bytes']} B at "
                 f"{s['rans_encode_msym_s']:.1f}/{s['rans_decode_msym_s']:.1f} Msym/s enc/dec, zstd or raw "
                 f"{s['zstd_or_raw_bytes']} B)") if "rans_bytes" in s else ""
        log(f"section {tag}: {s['bytes']} bytes, coder {s['coder']}{extra}")
    log("bytes per component: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["shares"].items()))
    write_bytes_atomic(data, output)  # both files at the end: Ctrl-C before here leaves nothing half-written
    tenerv.write_json_atomic(result, json_path)
    log(f"{output} ({pipeline_text(cc)}): {len(data)} bytes, {result['bpp']:.4f} bpp (estimated {result['rate_estimate_bpp']:.4f} "
        f"for the weights), PSNR {p:.2f} dB (float {psnr_float:.2f} dB before QAT, {psnr_float_after:.2f} dB after), "
        f"MS-SSIM {m:.4f}")
    return result


def decode_file(path):
    """A .tnrv file -> (model, frames (T, 3, H, W) in [0, 1], decoding frames/s), on the CPU."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    model, _ = decode_model(data)
    recon, fps = tenerv.reconstruct(model, torch.device("cpu"))
    return model, recon, fps


def cmd_encode(args):
    cc = CompressConfig(bits=args.bits, bits_grids=args.bits_grids, prune=args.prune, prune_epochs=args.prune_epochs,
                        lmbda=args.lmbda)
    encode_run(args.run, args.output, args.qat_epochs, args.coder, args.frames, args.size, args.json, args.device,
               matrix=args.matrix, cc=cc)


def cmd_decode(args):
    tenerv.check_writable(args.out, "--out", folder=True)
    model, recon, fps = decode_file(args.file)
    tenerv.save_frames(recon, args.out)
    print(f"decoded {video_text(recon.shape)} to {args.out} at {fps:.1f} frames/s")
    if args.frames:
        frames = tenerv.load_frames(args.frames, args.size, args.matrix)
        if tuple(frames.shape) != tuple(recon.shape):
            raise ValueError(f"{args.frames}: {video_text(frames.shape)} do not match the decoded {video_text(recon.shape)}")
        p, m = tenerv.quality(recon, frames)  # the reconstruction again: no second forward pass
        print(f"PSNR {p.mean().item():.2f} dB  MS-SSIM {m:.4f}  against {args.frames}")


def synthetic_weights(seed=2, bits=8):
    """1.2M N-bit-weight-like symbols: 34 Laplacian tensors of varied size and spread, as wide at
    N bits as at 8 bits relative to their range (a coder benchmark)."""
    rng = np.random.default_rng(seed)
    Q, shrink = qmax(bits), 2.0 ** (bits - 8)
    lap = lambda n, s: (np.clip(np.round(rng.laplace(0, s * shrink, n)), -Q, Q) + 128).astype(np.uint8)  # noqa: E731
    return ([lap(n, s) for n, s in [(600_000, 8), (300_000, 4), (200_000, 12), (50_000, 20)]]
            + [lap(int(rng.integers(50, 4000)), float(rng.uniform(1, 20))) for _ in range(30)])


def cmd_bench(args):
    """Coder size against the summed zeroth-order entropy, and speed (best of --repeats): the file's
    own values (its two sections), then synthetic ones at the file's largest bit depth."""
    with open(args.file, "rb") as f:
        _, _, tensors = read_tensors(f.read())
    bits = max((b for _, _, b, _, _ in tensors), default=8)
    depths = "/".join(str(b) for b in sorted({b for _, _, b, _, _ in tensors}, reverse=True)) or "8"
    big = [v for _, shape, _, _, v in tensors if math.prod(shape) >= SMALL]
    small = [v for _, shape, _, _, v in tensors if math.prod(shape) < SMALL]
    for name, values in ((f"{args.file} BIG_ ({depths}-bit tensors of >= {SMALL} values)", big),
                         (f"{args.file} SMAL (smaller tensors)", small), (f"synthetic {bits}-bit", synthetic_weights(bits=bits))):
        n = sum(len(v) for v in values)
        if n == 0:
            print(f"{name}: no symbols")
            continue
        coder = rans_coder(values)
        t_enc = t_dec = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            data = coder.encode(np.concatenate(values))
            t1 = time.perf_counter()
            out = coder.decode(data, n)
            t_enc, t_dec = min(t_enc, t1 - t0), min(t_dec, time.perf_counter() - t1)
        assert np.array_equal(out, np.concatenate(values))
        ent = entropy_bytes(values)
        z = len(zstandard.ZstdCompressor(level=19).compress(np.concatenate(values).tobytes()))
        v1 = len(RANSCoder(coder.sizes, coder.ranges, version=1).encode(np.concatenate(values)))  # the flat prior
        print(f"{name}: {n} symbols, {len(values)} tensors, {coder.lanes} lanes | rANS {len(data)} B "
              f"({100 * (len(data) / ent - 1):+.2f}% vs entropy {ent:.0f} B; version-1 model {100 * (v1 / ent - 1):+.2f}%), "
              f"zstd -19 {z} B ({100 * (z / ent - 1):+.2f}%) | "
              f"encode {n / t_enc / 1e6:.1f} Msym/s, decode {n / t_dec / 1e6:.1f} Msym/s (best of {args.repeats})")


def main(argv=None):
    p = argparse.ArgumentParser(description="Compress a TeNeRV run to a .tnrv file, or decode one.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="pruning, N-bit QAT, then write the bitstream")
    e.add_argument("run", help="run folder written by tenerv.py")
    e.add_argument("-o", "--output", required=True, help="the .tnrv file to write (its folder must exist)")
    e.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS, help="epochs of quantization-aware training (default: %(default)s, Sec. IV-D)")
    e.add_argument("--bits", type=int, default=CompressConfig.bits,
                   help=f"N, bits per weight, {BITS.start} to {BITS.stop - 1} (default: %(default)s)")
    e.add_argument("--bits-grids", type=int, default=CompressConfig.bits_grids,
                   help="N of the base and GoP grids alone, bits; 0: as --bits (default: %(default)s)")
    e.add_argument("--prune", type=float, default=CompressConfig.prune,
                   help="fraction of each convolution weight's smallest values set to 0 before QAT, e.g. 0.15 (default: %(default)s)")
    e.add_argument("--prune-epochs", type=int, default=CompressConfig.prune_epochs,
                   help="epochs of float fine-tuning after pruning, before QAT (default: %(default)s)")
    e.add_argument("--lambda", dest="lmbda", type=float, default=CompressConfig.lmbda,
                   help="λ: QAT minimises distortion + λ * estimated rate in bits per pixel, e.g. 0.01 (default: %(default)s)")
    e.add_argument("--coder", default="auto", choices=("auto", "zstd"),
                   help="auto: rANS or zstd per section, whichever is smaller (default: %(default)s)")
    e.add_argument("--frames", default=None, help="the original frames (default: the run's)")
    e.add_argument("--size", default=None, help="WxH when --frames is a .yuv file, pixels")
    e.add_argument("--matrix", type=int, default=None, choices=tuple(tenerv.MATRICES),
                   help=f"colour matrix of .yuv/.y4m frames (default: the run's, else {tenerv.DEFAULT_MATRIX})")
    e.add_argument("--json", default=None, help="where to write the report (default: next to the output)")
    e.add_argument("--device", default="auto", choices=("auto", "cpu"), help="where to run QAT (default: %(default)s)")
    d = sub.add_parser("decode", help="rebuild the frames from a .tnrv file")
    d.add_argument("file", help="a .tnrv file")
    d.add_argument("--out", required=True, help="folder for the PNG frames (made if missing)")
    d.add_argument("--frames", default=None, help="original frames: also report PSNR and MS-SSIM")
    d.add_argument("--size", default=None, help="WxH when --frames is a .yuv file, pixels")
    d.add_argument("--matrix", type=int, default=tenerv.DEFAULT_MATRIX, choices=tuple(tenerv.MATRICES),
                   help="colour matrix when --frames is a .yuv/.y4m file (default: %(default)s)")
    b = sub.add_parser("bench", help="time the built-in coder on a file's weights and on synthetic ones")
    b.add_argument("file", help="a .tnrv file")
    b.add_argument("--repeats", type=int, default=5, help="timing runs; the best counts (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "bench":
            if args.repeats < 1:
                raise ValueError(f"--repeats {args.repeats}: must be at least 1")
            if not os.path.exists(args.file):
                raise FileNotFoundError(f"{args.file}: no such file")
            cmd_bench(args)
        elif args.cmd == "encode":
            if args.qat_epochs < 0:
                raise ValueError(f"--qat-epochs {args.qat_epochs}: must be 0 or more")
            cmd_encode(args)
        else:
            cmd_decode(args)
    except (ValueError, FileNotFoundError) as e:  # FormatError is a ValueError
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # one line, no traceback; every file is written whole or not at all
        print({"encode": f"interrupted: {args.output} was not written; run the same command again",
               "decode": f"interrupted: {getattr(args, 'out', '')} holds only some of the frames; run the same command again",
               "bench": "interrupted"}[args.cmd], file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
