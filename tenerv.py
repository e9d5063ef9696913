"""
TeNeRV: a video stored as the weights of a network, with hierarchical temporal modelling.

Paper: J. Zhu et al., "Video Compression with Hierarchical Temporal Neural Representation"
(TeNeRV). This file is the method of Sec. III in the paper's order: base temporal grids
(Eq. 1, 3), Inter-Frame Feature Fusion (Eq. 2), divergence (Eq. 4) and content-aware GoP
partition (Algorithm 1), GoP-level grids (Eq. 5), TeNeRV blocks with GoP-specific depthwise
and shared pointwise convolutions, and the two-stage training of Sec. III-C.

    python tenerv.py --frames data/bbb320 --params 0.3M --epochs 50
    python tenerv.py --frames clip_1920x1080.yuv --params 3M --dry-run
    python tenerv.py --frames data/bbb320 --params 0.3M --ablation V3 --out runs/v3
"""
import argparse
import copy
import json
import math
import os
import pathlib
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# frames in and out, PSNR and MS-SSIM: video.py (shared with compress.py and rd.py)
from video import (DEFAULT_MATRIX, MATRICES, load_frames, msssim, msssim_scales, psnr, quality,  # noqa: F401
                   save_frames, write_atomic, yuv420_to_rgb)

# -----------------------------------------------------------------------------
# Configuration

ABLATIONS = ("V1", "V2", "V3", "V4", "V5")  # Table III


@dataclass
class TeNeRVConfig:
    # the video (filled in from the frames)
    n_frames: int = 0            # T
    height: int = 0              # H, pixels
    width: int = 0               # W, pixels
    # size: the one dial; everything below marked "derived" follows from it (size_model)
    params: int = 300_000        # target parameter count of the final (stage-2) model
    strides: tuple = ()          # upsampling factor of each TeNeRV block; () = derived from H, W
    base_h: int = 0              # grid height (derived: ceil(H / prod(strides)))
    base_w: int = 0              # grid width (derived)
    grid_stride: int = 0         # base positions per cell of the finest grid level (derived: 1 unless that busts grid_share)
    grid_levels: int = 3         # not in the paper: temporal resolutions T+l-1, /2, /4 (multi-resolution as FFNeRV, Eq. 1)
    grid_share: float = 0.4      # not in the paper: fraction of the budget given to the base grids
    grid_channels: tuple = ()    # channels of each grid level (derived: grid_share split evenly over levels)
    dim: int = 0                 # C_0, channels at grid resolution (derived from the budget)
    dim_hidden0: int = 0         # hidden width of the first block's pointwise MLP (derived, fine knob)
    width_ratio: float = 2.0     # not in the paper: channels divide by this at each upsampling block
    min_dim: int = 8             # narrowest block, channels
    depths: tuple = ()           # refinement units per block (derived: 3 between grid and full resolution, else 1)
    expansions: tuple = ()       # pointwise MLP hidden width / channels per block (derived: 4, 1 at full resolution)
    kernel: int = 5              # depthwise kernel size (not in the paper)
    window: int = 3              # l, IFF window size (Eq. 2; the paper gives no value)
    shared_window: bool = True   # not in the paper (our reading of Sec. III-C): one IFF window for all frames in stage 1
    gops: int = 0                # K, number of GoPs; 0 = derived from T (see default_gops)
    min_gop: int = 0             # L_min of Algorithm 1, frames; 0 = derived
    ablation: str = ""           # "" (full TeNeRV) or V1..V5 of Table III
    # training (Sec. III-C, IV-A)
    epochs: int = 300            # total epochs of both stages (Sec. IV-A)
    l1_epochs: int = 0           # L1-only epochs out of 300, scaled with --epochs; not in the paper: Sec. IV-A has 30
    pretrain_epochs: int = 30    # not in the paper: stage-1 (holistic) epochs out of 300; scales with --epochs
    batch_size: int = 1          # frames per step
    patches: int = 0             # not in the paper: 1 = whole frames; P > 1 = a step takes batch_size * P random (frame, patch)
                                 # pairs; 0 = chosen from the frames (choose_patches: 2 for fast motion and cuts, else 1)
    lr: float = 1e-2             # Adam peak learning rate (not in the paper; 1e-2 diverged before the LayerNorm)
    grid_lr: float = 5.0         # learning-rate multiplier of the grids (not in the paper)
    iff_lr: float = 1.0          # learning-rate multiplier of the IFF weights (not in the paper)
    warmup: float = 0.03         # fraction of steps of linear warm-up, then cosine to 0 (not in the paper)
    clip_grad: float = 1.0       # not in the paper (HiNeRV's): the gradient's global norm is clipped to this; 0 = off
    beta2: float = 0.99          # Adam's second-moment decay; not in the paper (Instant-NGP's 0.99; PyTorch's default 0.999)
    l1_weight: float = 0.7       # loss after the L1 epochs = l1_weight * L1 + msssim_weight * (1 - MS-SSIM);
    msssim_weight: float = 0.3   # not in the paper: it names the two terms, not their weights (HiNeRV's 0.7/0.3)
    seed: int = 0
    checkpoint_seconds: float = 120.0  # write the resumable checkpoint at least this often


def parse_params(text):
    """'3M', '0.3M', '300K', '3000000' -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"--params {text!r}: expected a number like 3M, 0.3M, 300K or 3000000")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if n < 1:
        raise ValueError(f"--params {text!r}: must be at least 1")
    return int(round(n))


# -----------------------------------------------------------------------------
# III-A. Base temporal grids (Eq. 1, 3)

def grid_sizes(n_positions, n_levels, stride=1):
    """Temporal resolution of each level: n_positions / stride, then halving (at least 2)."""
    return [max(2, math.ceil(n_positions / stride / 2 ** j)) for j in range(n_levels)]


class TemporalGrids(nn.Module):
    """gamma_base: multi-resolution learnable grids over time (FFNeRV's, Eq. 1), linearly interpolated.

    Level j holds ceil(n_positions / 2^j) feature maps of shape (c_j, h, w). Not in the paper (and
    not FFNeRV's, whose levels have equal width): coarser levels are wider, so that every level
    holds about the same number of values. A query at base position i (0-based,
    0 <= i < T + l - 1, Eq. 3) interpolates each level at the same relative time and concatenates
    the levels along channels.
    """

    def __init__(self, n_positions, channels, h, w, stride=1):
        super().__init__()
        self.n_positions = n_positions
        sizes = grid_sizes(n_positions, len(channels), stride)
        # not in the paper: grids start as N(0, 0.1^2)
        self.levels = nn.ParameterList([nn.Parameter(0.1 * torch.randn(n, c, h, w)) for n, c in zip(sizes, channels)])

    def forward(self, i):  # i: (N,) base positions -> (N, levels * c, h, w)
        u = i.float() / max(self.n_positions - 1, 1)  # relative time in [0, 1]
        out = []
        for grid in self.levels:
            f = u * (grid.shape[0] - 1)
            lo = f.floor().long().clamp(0, grid.shape[0] - 2)
            a = (f - lo).view(-1, 1, 1, 1)
            out.append((1 - a) * grid[lo] + a * grid[lo + 1])  # Eq. 1: linear interpolation in time
        return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# III-A. Inter-frame Feature Fusion (Eq. 2)

class InterFrameFusion(nn.Module):
    """X_tem^t = sum_{i=1..l} w_t^i X_base^{t+i-1}: a learnable window of l weights per frame.

    Not in the paper (our reading of Sec. III-C, `cfg.shared_window`): in stage 1 the T windows
    are one window shared by all frames, as "all weights are shared across timestamps" in
    pre-training; `duplicate` gives every frame its own copy for stage 2. Sec. III-C's list of
    what is duplicated at the switch (GoP-level grids, GoP-specific depthwise kernels) does not
    name W_T, so per-frame windows from the start (`shared_window=False`) are the other reading.
    """

    def __init__(self, n_windows, window):
        super().__init__()
        w = torch.zeros(n_windows, window)
        w[:, window // 2] = 1.0  # not in the paper: the window starts as a centred one-hot
        self.weight = nn.Parameter(w)  # W_T = {w_1, ..., w_T} (stage 2), or one shared w (stage 1)

    def forward(self, t, X_base):  # t: (B,), X_base: (B, l, C, h, w) at positions t .. t+l-1
        w = self.weight[t] if self.weight.shape[0] > 1 else self.weight.expand(len(t), -1)
        return torch.einsum("bl,blchw->bchw", w, X_base)

    def duplicate(self, T):
        """Stage 2: T copies of the window learned in stage 1, one per frame."""
        self.weight = nn.Parameter(self.weight.detach().repeat(T, 1))


# -----------------------------------------------------------------------------
# III-B. Divergence (Eq. 4) and content-aware GoP partition (Algorithm 1)

def divergence(X_tem):
    """D_t = 1 - cos(X_tem^t, X_tem^{t-1}) for t = 1..T-1 (0-based); D_0 = 0 (no predecessor).
    Not in the paper: the cosine is taken over the whole flattened (C, h, w) feature map."""
    x = X_tem.flatten(1).float()
    D = 1 - F.cosine_similarity(x[1:], x[:-1], dim=1)
    return torch.cat([D.new_zeros(1), D])


def default_gops(n_frames):
    """not in the paper: K = T/16 rounded, between 1 and 8, before the budget cap of gops_for_budget
    (L_min defaults to T/(2K), see size_model)."""
    return min(8, max(1, round(n_frames / 16)))


def check_gops(n_frames, K, L_min):
    if K < 1 or L_min < 1:
        raise ValueError(f"--gops {K} --min-gop {L_min}: both must be at least 1")
    if K * L_min > n_frames:
        raise ValueError(f"--gops {K} --min-gop {L_min}: {K} GoPs of at least {L_min} frames need "
                         f"{K * L_min} frames but the video has {n_frames}; lower --gops or --min-gop")


def partition_gops(D, K, L_min):
    """Algorithm 1. Returns the sorted 0-based first frames of GoPs 2..K.

    D: divergence per frame (D[0] is never a boundary, the video starts there). The rule is
    greedy, as the paper's: it need not find the partition of largest total divergence
    (D = [0, .5, .6, 0, .3, .7, 1], K = 3, L_min = 2 gives [2, 4], not [2, 5]). Edge cases the
    paper leaves open: line 6 finds several short GoPs at once, and we mend the earliest in time
    first; ties in D keep the earlier frame first (a stable sort); K = 1 returns []; K * L_min > T
    raises ValueError (no valid partition exists); if the candidates run out before every GoP is
    long enough, we fall back to the valid partition of K GoPs whose boundaries have the largest
    total divergence (dynamic programming), which always exists when K * L_min <= T.
    """
    D = [float(d) for d in D]
    T = len(D)
    check_gops(T, K, L_min)
    if K == 1:
        return []
    C = sorted(range(1, T), key=lambda t: -D[t])  # line 1: candidates, descending divergence (stable)
    B = set(C[: K - 1])                           # line 2
    p = K - 1                                     # line 3 (0-based pointer to the next candidate)
    while True:                                   # line 4
        S = sorted(B | {0, T})                    # line 5
        short = [(u, v) for u, v in zip(S, S[1:]) if v - u < L_min]  # line 6
        if not short:                             # lines 7-8
            return sorted(B)
        if p >= len(C):                           # not in the paper: candidates exhausted
            return _best_partition(D, K, L_min)
        u, v = short[0]                           # not in the paper: the earliest short GoP first
        b = min((x for x in (u, v) if x in B), key=lambda x: D[x])  # line 10: the weaker boundary
        B = (B - {b}) | {C[p]}                    # line 11
        p += 1                                    # line 12


def _best_partition(D, K, L_min):
    """Boundaries b_1 < ... < b_{K-1} with every GoP >= L_min frames maximising sum D[b]."""
    T = len(D)
    NEG = float("-inf")
    # best[k][t]: best score with k boundaries placed, the last one at t (t = 0 for k = 0)
    best = [[NEG] * (T + 1) for _ in range(K)]
    back = [[0] * (T + 1) for _ in range(K)]
    best[0][0] = 0.0
    for k in range(1, K):
        for t in range(k * L_min, T - (K - k) * L_min + 1):
            for s in range(0, t - L_min + 1):
                if best[k - 1][s] > NEG and best[k - 1][s] + D[t] > best[k][t]:
                    best[k][t], back[k][t] = best[k - 1][s] + D[t], s
    t = max(range(T + 1), key=lambda x: best[K - 1][x] if T - x >= L_min else NEG)
    out = []
    for k in range(K - 1, 0, -1):
        out.append(t)
        t = back[k][t]
    return sorted(out)


def equal_gops(n_frames, K):
    """V5: content-agnostic boundaries of K GoPs of (nearly) equal length."""
    return [round(k * n_frames / K) for k in range(1, K)]


def fixed_gop_length(n_frames, K):
    """V4: the GoP length L, a power of two as codecs' intra periods (not in the paper), the
    shortest with ceil(T / L) <= K GoPs."""
    return 2 ** math.ceil(math.log2(max(n_frames / K, 1)))


def fixed_length_gops(n_frames, K):
    """V4: content-agnostic GoPs of fixed_gop_length frames from the start; the last takes the rest."""
    return list(range(fixed_gop_length(n_frames, K), n_frames, fixed_gop_length(n_frames, K)))


def gop_index(boundaries, n_frames):
    """(T,) long tensor: the GoP k of each frame (0-based) given the first frames of GoPs 2..K."""
    g = torch.zeros(n_frames, dtype=torch.long)
    for b in boundaries:
        g[b:] += 1
    return g


# -----------------------------------------------------------------------------
# III-B. TeNeRV block: upsampling, GoP-specific depthwise conv, shared pointwise convs

class GoPDepthwiseConv(nn.Module):
    """A depthwise k x k conv with one kernel set per GoP (K sets).

    A batch mixing frames of several GoPs runs as one grouped convolution: the batch is
    folded into the channels, and frame b's channels are convolved with its GoP's kernels.
    """

    def __init__(self, dim, kernel, n_gops=1):
        super().__init__()
        bound = 1 / kernel  # PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = k*k
        self.weight = nn.Parameter(torch.empty(n_gops, dim, 1, kernel, kernel).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_gops, dim).uniform_(-bound, bound))

    def forward(self, x, gop):  # x: (B, C, H, W), gop: (B,) GoP index of each frame
        B, C, H, W = x.shape
        k = self.weight.shape[-1]
        if self.weight.shape[0] == 1:  # one shared kernel set (stage 1, ablation V3)
            return F.conv2d(x, self.weight[0], self.bias[0], padding=k // 2, groups=C)
        w = self.weight[gop].reshape(B * C, 1, k, k)
        y = F.conv2d(x.reshape(1, B * C, H, W), w, self.bias[gop].reshape(B * C),
                     padding=k // 2, groups=B * C)  # groups = B*C: each frame uses its own GoP's kernels
        return y.view(B, C, H, W)

    def duplicate(self, K):
        """Stage 2 (Sec. III-C): K copies of the pre-trained kernels."""
        self.weight = nn.Parameter(self.weight.detach()[:1].repeat(K, 1, 1, 1, 1))
        self.bias = nn.Parameter(self.bias.detach()[:1].repeat(K, 1))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel (ConvNeXt's channels-first LayerNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):  # x: (B, C, H, W)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class Refinement(nn.Module):
    """x + pw2(GELU(pw1(LN(dw(x))))): depthwise k x k conv (GoP-specific), LayerNorm, pointwise MLP
    (shared). The LayerNorm is not in the paper; it is HiNeRV's ConvNeXt block (measured: +0.6 dB
    at 10 epochs, and lr 1e-2 no longer diverges)."""

    def __init__(self, dim, kernel, dim_hidden, n_gops=1):
        super().__init__()
        self.dw = GoPDepthwiseConv(dim, kernel, n_gops)
        self.norm = ChannelLayerNorm(dim)
        self.pw1 = nn.Conv2d(dim, dim_hidden, 1)
        self.pw2 = nn.Conv2d(dim_hidden, dim, 1)

    def forward(self, x, gop):
        return x + self.pw2(F.gelu(self.pw1(self.norm(self.dw(x, gop)))))


class TeNeRVBlock(nn.Module):
    """Upsample by `stride`, then refine with `depth` depthwise-separable residual units.

    x -> 1x1 conv (dim_in -> dim_out * stride^2) -> pixel shuffle -> Refinement x depth
    The upsampling is NeRV/HNeRV's conv + PixelShuffle with a 1x1 kernel (a stride-s, kernel-s
    transposed conv): each of the s x s sub-pixels of a cell gets its own projection of the cell's
    features, run at the low resolution. Not in the paper; it replaced bilinear upsampling plus a
    learned (C, s, s) sub-pixel code (measured at 10 epochs, same parameter count: +1.3 dB alone,
    +0.9 dB on top of the LayerNorm, and faster on the CPU).
    """

    def __init__(self, dim_in, dim_out, stride, kernel, dim_hidden, depth=1, n_gops=1):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(dim_in, dim_out * stride ** 2, 1)
        self.units = nn.ModuleList([Refinement(dim_out, kernel, dim_hidden, n_gops) for _ in range(depth)])

    def forward(self, x, gop):
        x = self.proj(x)
        if self.stride > 1:
            x = F.pixel_shuffle(x, self.stride)
        for unit in self.units:
            x = unit(x, gop)
        return x


# -----------------------------------------------------------------------------
# The model (Fig. 2)

def block_dims(cfg):
    """Channels of block 0 (at grid resolution) and of each upsampling block."""
    return [cfg.dim] + [max(cfg.min_dim, round(cfg.dim / cfg.width_ratio ** (i + 1))) for i in range(len(cfg.strides))]


class TeNeRV(nn.Module):
    """Frame index t -> RGB frame. Stage 1 (holistic) has one GoP grid, one kernel set and one IFF
    window; `split_gops` turns it into the stage-2 model with K of each and T windows (Sec. III-C)."""

    def __init__(self, cfg, stage=1):
        super().__init__()
        self.cfg = cfg
        T, l = cfg.n_frames, self.window
        K = cfg.gops if stage == 2 else 1
        self.grids = TemporalGrids(T + l - 1, cfg.grid_channels, cfg.base_h, cfg.base_w, cfg.grid_stride)
        n_windows = T if stage == 2 or not cfg.shared_window else 1
        self.iff = InterFrameFusion(n_windows, l) if cfg.ablation != "V1" else None  # V1: base grids only
        dim_grid = sum(cfg.grid_channels)
        # Eq. (5): one GoP-level grid per GoP (V2: none); not in the paper: it starts at zero
        self.gop_grid = nn.Parameter(torch.zeros(K, dim_grid, cfg.base_h, cfg.base_w)) if cfg.ablation != "V2" else None
        self.register_buffer("gop_of_frame", torch.zeros(T, dtype=torch.long))
        dims = block_dims(cfg)
        # not in the paper: block 0 refines at grid resolution (stride 1) before the upsampling blocks
        n_dw = 1 if cfg.ablation == "V3" else K  # V3: one shared depthwise kernel set
        self.blocks = nn.ModuleList([TeNeRVBlock(dim_grid, dims[0], 1, cfg.kernel, cfg.dim_hidden0, cfg.depths[0], n_dw)])
        for i, s in enumerate(cfg.strides):
            self.blocks.append(TeNeRVBlock(dims[i], dims[i + 1], s, cfg.kernel, cfg.expansions[i + 1] * dims[i + 1],
                                           cfg.depths[i + 1], n_dw))
        self.head = nn.Conv2d(dims[-1], 3, 3, padding=1)  # not in the paper: a 3x3 conv to RGB, no activation
        self.stage = stage
        # channels-last activations: train and reconstruct turn it on for CUDA, the usual layout for
        # cuDNN's bf16 convolutions (its GPU speed is not measured here; on the CPU it lost in stage 2).
        # Activations only: the GoP-specific depthwise kernels are 5-D, which
        # Module.to(memory_format=torch.channels_last) refuses.
        self.channels_last = False

    @property
    def window(self):
        return 1 if self.cfg.ablation == "V1" else self.cfg.window

    def temporal_features(self, t):
        """X_tem^t for frames t (B,): Eq. 3 positions t..t+l-1, fused by Eq. 2."""
        l = self.window
        i = t[:, None] + torch.arange(l, device=t.device)  # (B, l) base positions
        X_base = self.grids(i.flatten())
        if self.iff is None:
            return X_base
        return self.iff(t, X_base.view(len(t), l, *X_base.shape[1:]))

    def margin(self):
        """Receptive radius of the blocks after block 0 and of the head, in grid cells (rounded up): a
        crop of block 0's output that reaches this far past a patch gives the patch exactly."""
        r, S = 0.0, 1
        for block, s in zip(self.blocks[1:], self.cfg.strides):
            S *= s
            r += len(block.units) * (self.cfg.kernel // 2) / S  # 1x1 projection + pixel shuffle: no reach
        return math.ceil(r + (self.head.kernel_size[0] // 2) / S - 1e-9)

    def forward(self, t, crop=None):  # t: (B,) frame indices -> (B, 3, H, W)
        """crop = (offsets, (h, w)): frame b continues past block 0 on the h x w grid cells at
        offsets[b] = (y, x) only, and the output is that window's (h*S, w*S) pixels, uncropped."""
        gop = self.gop_of_frame[t]
        x = self.temporal_features(t)
        if self.gop_grid is not None:
            x = x + self.gop_grid[gop if self.gop_grid.shape[0] > 1 else torch.zeros_like(gop)]  # Eq. 5
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(self.blocks):
            x = block(x, gop)
            if i == 0 and crop is not None:
                (h, w) = crop[1]
                x = torch.stack([x[b, :, y:y + h, x0:x0 + w] for b, (y, x0) in enumerate(crop[0])])
        if crop is not None:
            return self.head(x)
        return self.head(x)[..., : self.cfg.height, : self.cfg.width]  # crop the padding

    @torch.no_grad()
    def all_temporal_features(self):
        return torch.cat([self.temporal_features(t) for t in torch.arange(self.cfg.n_frames, device=self.gop_of_frame.device).split(64)])

    def split_gops(self, boundaries):
        """Stage 1 -> 2: K copies of the GoP grid and of every depthwise kernel set (Sec. III-C), and
        (shared_window) a copy of the IFF window for every frame."""
        K = len(boundaries) + 1
        assert self.stage == 1 and K == self.cfg.gops, (K, self.cfg.gops)
        self.gop_of_frame.copy_(gop_index(boundaries, self.cfg.n_frames))
        if self.gop_grid is not None:
            self.gop_grid = nn.Parameter(self.gop_grid.detach().repeat(K, 1, 1, 1))
        if self.iff is not None and self.iff.weight.shape[0] == 1:
            self.iff.duplicate(self.cfg.n_frames)
        if self.cfg.ablation != "V3":
            for m in self.modules():
                if isinstance(m, GoPDepthwiseConv):
                    m.duplicate(K)
        self.stage = 2


# -----------------------------------------------------------------------------
# Parameter budget: --params sets every width

BASE_AREA = 576             # not in the paper: grids of about 32 x 18 cells (measured: +1.2 dB over 16 x 9)
MAX_PADDING = 0.10          # at most 10% more pixels than the frame
DEEP = 3                    # refinement units in a deep block


def default_depths(n_blocks):
    """not in the paper (HiNeRV's pattern): refinement units and MLP expansion of each block. The
    blocks between the grid and the full resolution are deep (DEEP units) with a 4x-wide MLP; block 0
    at grid resolution has one unit with a 4x MLP, the full-resolution block one unit with a 1x MLP.
    Measured at 0.3M, 50 epochs (docs/experiments.md) against the earlier split (block 0 deep, every
    upsampling block one narrow unit), 2-seed means: +0.51 dB on bbb320, +0.32 on bikes64, +0.58 on
    carphone; -0.16 on bikes250 (-0.54 / +0.23 by seed, a mid-training dip that Adam's beta2 0.99
    removed: level with the earlier split then); 1.6-2.0x the time per epoch. With one upsampling
    block, block 0 is the deep one."""
    if n_blocks == 2:
        return (DEEP, 1), (4, 1)
    return (1,) + (DEEP,) * (n_blocks - 2) + (1,), (4,) * (n_blocks - 1) + (1,)


def choose_strides(H, W):
    """Total stride S = 5^a 3^b 2^c with a grid near BASE_AREA cells and little padding."""
    best = None
    for a in range(3):
        for b in range(3):
            for c in range(9):
                S = 5 ** a * 3 ** b * 2 ** c
                if S < 2 or S > min(H, W):
                    continue
                h, w = math.ceil(H / S), math.ceil(W / S)
                waste = h * w * S * S / (H * W) - 1
                if waste > MAX_PADDING:
                    continue
                score = abs(math.log(h * w / BASE_AREA)) + 10 * waste
                if best is None or score < best[0]:
                    best = (score, (5,) * a + (3,) * b + (2,) * c)
    if best is None:
        raise ValueError(f"no upsampling strides fit {W}x{H}; pass --strides, e.g. --strides 2,2")
    return best[1]


GOP_SHARE = 0.05            # not in the paper: the K - 1 extra GoP copies take at most ~5% of the budget


def gops_for_budget(cfg):
    """not in the paper: the default K. One GoP per 16 frames (default_gops), but each GoP past the
    first costs a GoP-level grid and a set of depthwise kernels, which at small budgets and short
    clips is a large share (0.3M, 64 frames of 320x180: 3.6% per GoP) taken from the shared
    network; measured there, 4 GoPs lost 0.4 dB to 2. So K is also capped so that the K - 1
    extra copies take at most GOP_SHARE of the budget. Computed on the full model, so that every
    ablation is under the same cap (V1-V3 and V5 use this K; V4 at most this K)."""
    K0 = default_gops(cfg.n_frames)
    full = size_model(replace(cfg, gops=K0, min_gop=0, ablation=""))
    per_gop = count_params(replace(full, gops=K0 + 1)) - count_params(full)
    return max(1, min(K0, 1 + int(GOP_SHARE * cfg.params / per_gop)))


def count_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in TeNeRV(cfg, stage=2).parameters())


def size_model(cfg):
    """Fill in the derived fields so that the stage-2 model has cfg.params parameters (±1%)."""
    T, H, W = cfg.n_frames, cfg.height, cfg.width
    if cfg.ablation not in ("",) + ABLATIONS:
        raise ValueError(f"--ablation {cfg.ablation!r}: expected one of {', '.join(ABLATIONS)}")
    if cfg.window < 1:
        raise ValueError(f"--window {cfg.window}: must be at least 1")
    strides = tuple(cfg.strides) or choose_strides(H, W)
    if any(s < 1 for s in strides):
        raise ValueError(f"--strides {strides}: every stride must be at least 1")
    S = math.prod(strides)
    if S > min(H, W):
        raise ValueError(f"--strides {','.join(map(str, strides))}: total stride {S} exceeds the {W}x{H} frame")
    K = cfg.gops or gops_for_budget(cfg)
    if cfg.ablation == "V4":  # fixed-length GoPs: K follows from the length, under the same cap
        K = math.ceil(T / fixed_gop_length(T, K))
    L_min = cfg.min_gop or max(1, T // (2 * K))  # half the mean GoP length of the K chosen
    check_gops(T, K, L_min)
    cfg = replace(cfg, strides=strides, base_h=math.ceil(H / S), base_w=math.ceil(W / S), gops=K, min_gop=L_min)
    derived_depths = not cfg.depths
    if not cfg.depths or not cfg.expansions:
        depths, expansions = default_depths(len(strides) + 1)
        cfg = replace(cfg, depths=cfg.depths or depths, expansions=cfg.expansions or expansions)
    if len(cfg.depths) != len(strides) + 1 or len(cfg.expansions) != len(strides) + 1:
        raise ValueError(f"--depths {','.join(map(str, cfg.depths))} / --expansions {','.join(map(str, cfg.expansions))}: "
                         f"need one entry per block, {len(strides) + 1} here (block 0 and one per stride)")

    n_positions = T + (1 if cfg.ablation == "V1" else cfg.window) - 1
    per_level = cfg.grid_share * cfg.params / cfg.grid_levels
    if not cfg.grid_stride:
        # not in the paper: the finest level has one cell per base position (Eq. 3) when one
        # channel of it fits in half the grids' share of the budget; a long clip at a small budget
        # (300 frames of 176x144 at 0.3M) would otherwise spend 70% of the budget on grids of one
        # channel. Then a cell spans `stride` positions, still queried at all T + l - 1 by Eq. 1.
        # Half, not a level's third: a cell per frame gained +0.68 / +0.78 dB (2 seeds) on bikes64
        # and carphone at 0.3M (docs/experiments.md), more than the coarser levels' channels.
        fits = max(2, int(cfg.grid_share * cfg.params / 2 / (cfg.base_h * cfg.base_w)))
        cfg = replace(cfg, grid_stride=math.ceil(n_positions / fits))
    sizes = grid_sizes(n_positions, cfg.grid_levels, cfg.grid_stride)
    grid_channels = [max(1, round(per_level / (n * cfg.base_h * cfg.base_w))) for n in sizes]

    def sized(dim, grid_channels):
        c = replace(cfg, dim=dim, grid_channels=tuple(grid_channels), dim_hidden0=cfg.expansions[0] * dim)
        return c, count_params(c)

    while True:  # a tight budget: narrower grids first, then one unit per block (if the depths are derived)
        lo_cfg, lo_n = sized(cfg.min_dim, grid_channels)
        if lo_n <= cfg.params:
            break
        if max(grid_channels) > 1:
            grid_channels = [max(1, c // 2) for c in grid_channels]
        elif derived_depths and max(cfg.depths) > 1:
            cfg = replace(cfg, depths=(1,) * len(cfg.depths))
        else:
            break
    if lo_n > cfg.params:
        raise ValueError(f"--params {cfg.params}: too small for {T} frames of {W}x{H}; the smallest model "
                         f"has {lo_n} parameters. Raise --params or use fewer frames")
    lo, hi = cfg.min_dim, cfg.min_dim
    while sized(hi, grid_channels)[1] <= cfg.params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest dim that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sized(mid, grid_channels)[1] <= cfg.params else (lo, mid)
    cfg, n = sized(lo, grid_channels)
    # fine knob: each hidden channel of the first block's MLPs costs depth * (2 * dim + 1) parameters
    cfg = replace(cfg, dim_hidden0=cfg.dim_hidden0 + round((cfg.params - n) / (cfg.depths[0] * (2 * cfg.dim + 1))))
    if cfg.patches > 1:
        patch_tiling(cfg, 0)  # --patches that no tiling of the grid gives: the error now, not at epoch 1
    n = count_params(cfg)
    if abs(n - cfg.params) > 0.01 * cfg.params:
        raise ValueError(f"--params {cfg.params}: the closest model has {n} parameters (more than 1% off); "
                         f"raise --params or pass other --strides")
    return cfg


# -----------------------------------------------------------------------------
# III-C. Two-stage training

def lr_at(step, n_steps, cfg):
    """not in the paper: linear warm-up for cfg.warmup of the steps, then cosine decay to 0."""
    n_warm = max(1, int(cfg.warmup * n_steps))
    if step < n_warm:
        return cfg.lr * (step + 1) / n_warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, n_steps - n_warm)))


def distortion(out, target, cfg, l1_only=False):
    """Sec. IV-A: L1 for the first epochs, then l1_weight * L1 + msssim_weight * (1 - MS-SSIM)."""
    l1 = (out - target).abs().mean()
    if l1_only:
        return l1
    return cfg.l1_weight * l1 + cfg.msssim_weight * (1 - msssim(out, target).mean())


def stage1_epochs(cfg):
    """Epochs of stage 1 (holistic pre-training). Not in the paper, which gives no length: by
    default 30 of 300 (the length of Sec. IV-A's L1-only phase), scaled with --epochs (pretrain_epochs)."""
    return max(1, round(cfg.epochs * cfg.pretrain_epochs / 300))


def l1_only_epochs(cfg):
    """Epochs trained with L1 alone, scaled with --epochs. Sec. IV-A trains its first 30 of 300 epochs so
    (`l1_epochs=30`); not in the paper: none by default, the hybrid loss from the first epoch, which
    gained on every clip of the suite at 50 epochs (docs/experiments.md)."""
    return round(cfg.epochs * cfg.l1_epochs / 300)


FAST_MOTION_PSNR = 26.5  # dB; not in the paper: below it, --patches 0 (the default) trains on 2 patches


def frame_change(frames):
    """Median PSNR (dB) between consecutive frames (T, 3, H, W) uint8: low for fast motion, pans and cuts
    (a cut is one pair; the median looks past it to the motion). inf for a single frame."""
    if len(frames) < 2:
        return math.inf
    mse = torch.stack([(frames[t + 1].float() - frames[t].float()).pow(2).mean() for t in range(len(frames) - 1)])
    return (10 * torch.log10(255 ** 2 / mse.clamp_min(1e-10))).median().item()


def choose_patches(cfg, frames, change=None):
    """P of a run: cfg.patches, or for 0 (not in the paper) 2 when consecutive frames differ much
    (frame_change below FAST_MOTION_PSNR) and 1 (whole frames) otherwise. Patches mix pairs of different
    frames in each step; measured at 0.3M, 50 epochs (docs/experiments.md), paired by seed: +0.50 / +0.87 dB
    on bikes64 and +0.31 / +0.23 on bikes250 (frame_change 23.5 and 25.1 dB), -0.23 on bbb320 and
    -0.51 / -0.31 on carphone (27.7 and 29.8 dB); the threshold sits between the two kinds."""
    if cfg.patches:
        return cfg.patches
    change = frame_change(frames) if change is None else change  # the caller's figure, if it has one
    return 2 if change < FAST_MOTION_PSNR and cfg.base_h * cfg.base_w > 1 else 1


def patch_tiling(cfg, margin):
    """not in the paper (HiNeRV trains on patches): cfg.patches tiles of the base grid, the
    factorisation n_h x n_w that needs the smallest crop. Returns (tiles, offsets, (h, w)): tile p
    covers grid rows y0:y1 and columns x0:x1; block 0's output is cropped to the h x w window at
    offsets[p], which holds the tile plus `margin` cells on every side that is not the grid's edge,
    so the tile's pixels are exactly those of the whole frame (tests/test_tenerv.py)."""
    Hg, Wg, P = cfg.base_h, cfg.base_w, cfg.patches
    best = None
    for nh in (d for d in range(1, P + 1) if P % d == 0 and d <= Hg and P // d <= Wg):
        nw = P // nh
        h = Hg if nh == 1 else min(Hg, math.ceil(Hg / nh) + 2 * margin)
        w = Wg if nw == 1 else min(Wg, math.ceil(Wg / nw) + 2 * margin)
        if best is None or h * w < best[0]:
            best = (h * w, nh, nw, h, w)
    if best is None:
        raise ValueError(f"--patches {P}: no n_h x n_w split of the {Wg}x{Hg}-cell grid into {P} tiles; use fewer")
    _, nh, nw, h, w = best
    ys = [round(i * Hg / nh) for i in range(nh + 1)]
    xs = [round(i * Wg / nw) for i in range(nw + 1)]
    tiles = [(ys[a], ys[a + 1], xs[b], xs[b + 1]) for a in range(nh) for b in range(nw)]
    offsets = [(min(max(y0 - margin, 0), Hg - h), min(max(x0 - margin, 0), Wg - w)) for y0, _, x0, _ in tiles]
    return tiles, offsets, (h, w)


def patch_step(net, frames_dev, t, k, tiling, cfg, l1_only):
    """Loss (mean over the pairs) and PSNR of each (frame t[b], patch k[b]) pair."""
    tiles, offsets, size = tiling
    S, H, W = math.prod(cfg.strides), cfg.height, cfg.width
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=frames_dev.is_cuda):
        out = net(t, ([offsets[p] for p in k.tolist()], size)).float()
    loss, psnrs = 0.0, []
    for b, (ti, p) in enumerate(zip(t.tolist(), k.tolist())):
        (y0, y1, x0, x1), (oy, ox) = tiles[p], offsets[p]
        h, w = min(y1 * S, H) - y0 * S, min(x1 * S, W) - x0 * S  # the tile's pixels inside the frame
        o = out[b:b + 1, :, (y0 - oy) * S:(y0 - oy) * S + h, (x0 - ox) * S:(x0 - ox) * S + w]
        target = frames_dev[ti:ti + 1, :, y0 * S:y0 * S + h, x0 * S:x0 * S + w].float() / 255
        loss = loss + distortion(o, target, cfg, l1_only) / len(t)
        psnrs.append(psnr(o.detach().clamp(0, 1), target))
    return loss, torch.cat(psnrs)


def make_optimizer(model, device):
    """Adam; the grids (base, GoP) learn grid_lr times faster, the IFF weights iff_lr times."""
    def group(prefixes):
        return [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    groups = [dict(params=group(("grids.", "gop_grid")), scale=model.cfg.grid_lr),
              dict(params=group(("iff.",)), scale=model.cfg.iff_lr),
              dict(params=group(("blocks.", "head.")), scale=1.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    return torch.optim.Adam(groups, lr=0.0, betas=(0.9, model.cfg.beta2), fused=device.type == "cuda")


def split_model(model, optimizer, boundaries, device):
    """Stage 1 -> 2. Not in the paper: the Adam moments of duplicated tensors are duplicated too."""
    names = {p: n for n, p in model.named_parameters()}
    old = {names[p]: s for p, s in optimizer.state.items()}
    model.split_gops(boundaries)
    optimizer = make_optimizer(model, device)
    for name, p in model.named_parameters():
        if name in old:
            optimizer.state[p] = {k: v.repeat(p.shape[0] // v.shape[0], *[1] * (v.dim() - 1))
                                  if v.dim() and v.shape != p.shape else v.clone() for k, v in old[name].items()}
    return optimizer


def save_atomic(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json_atomic(obj, path):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def config_from_dict(d):
    d = {"beta2": 0.999, **d}  # checkpoints written before beta2 existed were trained with Adam's default
    return TeNeRVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_checkpoint(path, device="cpu"):
    """(model, ckpt): the model rebuilt from a checkpoint's own config, and the checkpoint dict
    (config, stage, model, optimizer, state). Never unpickles objects."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = config_from_dict(ckpt["config"])
    model = TeNeRV(cfg, stage=ckpt["stage"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


@torch.no_grad()
def reconstruct(model, device, batch_size=4):
    """All frames (T, 3, H, W) in [0, 1], and decoding frames/s (forward only)."""
    model.eval()
    model.channels_last = device.type == "cuda"
    T = model.cfg.n_frames
    out = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for t in torch.arange(T, device=device).split(batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(t).float().clamp(0, 1))
    sync()
    fps = T / (time.perf_counter() - t0)
    model.train()
    return torch.cat(out), fps


def evaluate(model, frames, device):
    """PSNR per frame, mean MS-SSIM and decode speed of the model against uint8 frames."""
    recon, fps = reconstruct(model, device)
    return *quality(recon, frames), fps, recon


def hms(seconds):
    """A duration as m:ss or h:mm:ss."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


class Progress:
    """One line that updates in place on a terminal, one line per epoch through `log` otherwise
    (a caller's own `log` always gets one line per epoch, never the terminal's in-place line).
    The ETA counts from `start`, the first epoch of this session (a resumed run starts later)."""

    def __init__(self, n_epochs, log=print, start=0):
        self.n_epochs, self.start, self.t0 = n_epochs, start, time.time()
        self.tty = log is print and sys.stdout.isatty()
        self.log = (lambda s: print(s, flush=True)) if log is print else log  # a log file shows each epoch as it ends
        self.open_line = False  # the terminal line is mid-update (no newline yet)
        self.drawn = 0.0        # when the terminal line was last drawn

    def due(self):
        """Redraw the terminal line now? At most 4 times a second (each read of the loss syncs a GPU)."""
        return self.tty and time.time() - self.drawn >= 0.25

    def end_line(self):
        """End an in-place progress line, before other output."""
        if self.open_line:
            print()
            self.open_line = False

    def say(self, message):
        """A message of its own line, after ending an in-place progress line."""
        self.end_line()
        self.log(message)

    def update(self, epoch, done, total, loss, psnr_db, what, final=False):
        if not (self.tty or final):
            return
        frac = (epoch + done / total) / self.n_epochs
        ran = (epoch - self.start + done / total) / max(1, self.n_epochs - self.start)  # of this session's epochs
        eta = (time.time() - self.t0) / max(ran, 1e-9) * (1 - ran)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        line = f"[{bar}] epoch {epoch + 1}/{self.n_epochs} {what} loss {loss:.4f} psnr {psnr_db:.2f} dB  ETA {hms(eta)}"
        if self.tty:
            self.drawn = time.time()
            print("\r" + line, end="\n" if final else "", flush=True)
            self.open_line = not final
        else:
            self.log(line)


# -----------------------------------------------------------------------------
# More than one process (not in the paper): torchrun starts one copy of this file per GPU and sets
# RANK, LOCAL_RANK and WORLD_SIZE; every copy trains the same model on its share of each step's frames

def start_distributed(device):
    """Under torchrun: join the others (nccl on CUDA, gloo on CPU); the device, cuda:LOCAL_RANK on CUDA."""
    if "WORLD_SIZE" not in os.environ:  # not started by torchrun: one process, no process group
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world():
    """(this process's rank, number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def data_parallel(model, device):
    """Under torchrun, the model in DistributedDataParallel (gradients averaged over the processes); else itself."""
    return DDP(model, device_ids=[device] if device.type == "cuda" else None) if dist.is_initialized() else model


def train(cfg, frames, out_dir, device, resume=False, log=print):
    """Two-stage training of Sec. III-C; writes out_dir/ckpt.pt, returns (model, state). Ctrl-C saves the
    last finished epoch and raises KeyboardInterrupt("interrupted at epoch e/E"). Under torchrun each of
    the N processes takes cfg.batch_size frames of every step (N * batch_size); rank 0 writes the checkpoint."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    T, B, P = cfg.n_frames, cfg.batch_size, choose_patches(cfg, frames)
    E, E1, E_l1 = cfg.epochs, stage1_epochs(cfg), l1_only_epochs(cfg)
    rank, world = rank_and_world()
    frames_dev = frames.to(device)  # uint8, on every process: a float copy would take 4x the memory
    steps_per_epoch = math.ceil(T / (world * B))
    n_steps = E * steps_per_epoch

    if not resume:
        os.makedirs(out_dir, exist_ok=True)  # only now: a failed --resume leaves no empty folder
        torch.manual_seed(cfg.seed)
        model = TeNeRV(cfg).to(device)
        optimizer = make_optimizer(model, device)
        state = dict(epoch=0, history=[], train_seconds=0.0, boundaries=[], divergence=[])
    else:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"{ckpt_path}: no checkpoint to resume; run without --resume to start")
        model, ckpt = load_checkpoint(ckpt_path, device)
        saved = config_from_dict(ckpt["config"])
        if saved != cfg:
            diff = [k for k in asdict(cfg) if getattr(cfg, k) != getattr(saved, k)]
            raise ValueError(f"{ckpt_path}: was trained with other settings ({', '.join(diff)}); "
                             f"use the same flags to resume or another --out")
        optimizer = make_optimizer(model, device)
        optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        log(f"resuming {out_dir} at epoch {state['epoch']}/{E}")

    def snapshot():
        return dict(config=asdict(cfg), stage=model.stage, model=copy.deepcopy(model.state_dict()),
                    optimizer=copy.deepcopy(optimizer.state_dict()), state=copy.deepcopy(state))

    use_amp = device.type == "cuda"
    model.channels_last = use_amp
    net = data_parallel(model, device)  # torchrun: DDP around the model; else the model itself
    tiling = patch_tiling(replace(cfg, patches=P), model.margin()) if P > 1 else None
    state["patches"] = P
    last = snapshot()
    last_write = time.time()
    first = state["epoch"]
    progress = Progress(E, log, start=first)
    try:
        for epoch in range(first, E):
            t_epoch = time.time()
            if epoch >= E1 and model.stage == 1:
                optimizer = stage_switch(model, optimizer, state, device, progress.say)
                net = data_parallel(model, device)  # new parameters (the K copies): wrap them again
            # (frame, patch) pairs t * P + p; P = 1: frames
            order = torch.randperm(T * P, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            # running sums stay on the device: reading them (.item()) waits for the GPU, so only
            # the progress line does, a few times a second, and the end of the epoch
            tot_loss = torch.zeros((), dtype=torch.float64, device=device)
            tot_psnr = torch.zeros((), dtype=torch.float64, device=device)
            for j, batch in enumerate(order.split(world * B * P)):  # the same order on every process
                step = epoch * steps_per_epoch + j
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, n_steps, cfg) * g["scale"]
                t = batch[rank * B * P:(rank + 1) * B * P]  # this process's share of the step (all of it without torchrun)
                # not in the paper: DDP averages the N processes' gradients, so each weighs its mean loss by N times
                # its share of the step's frames: the step follows the mean over all of them even when the epoch's
                # last step leaves a process fewer frames or none (it runs a frame at weight 0 to join the all-reduce)
                n, share = len(t), len(t) * world / len(batch)
                t = t if n else batch[:1]
                if P == 1:
                    t = t.to(device)
                    target = frames_dev[t].float() / 255
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):  # not in the paper: bf16 on CUDA
                        out = net(t)
                    out = out.float()
                    loss = distortion(out, target, cfg, l1_only=epoch < E_l1)
                    psnrs = psnr(out.detach().clamp(0, 1), target)
                else:
                    loss, psnrs = patch_step(net, frames_dev, (t // P).to(device), t % P, tiling, cfg, epoch < E_l1)
                optimizer.zero_grad(set_to_none=True)
                (loss * share).backward()
                if cfg.clip_grad > 0:  # not in the paper (HiNeRV clips): no frame's step outweighs the others
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                tot_loss += loss.detach() * n / P  # sums per frame: a patch counts 1/P
                tot_psnr += psnrs[:n].sum() / P
                if progress.due():
                    seen = (j * B * P + n) / P
                    progress.update(epoch, j + 1, steps_per_epoch, tot_loss.item() / seen, tot_psnr.item() / seen,
                                    f"stage {model.stage}")
            if world > 1:  # the epoch's sums over every process's frames
                dist.all_reduce(tot_loss)
                dist.all_reduce(tot_psnr)
            epoch_loss, epoch_psnr = tot_loss.item() / T, tot_psnr.item() / T
            state["epoch"] = epoch + 1
            state["train_seconds"] += time.time() - t_epoch
            state["history"].append(dict(epoch=epoch + 1, stage=model.stage, loss=epoch_loss, psnr=epoch_psnr,
                                         seconds=time.time() - t_epoch))
            progress.update(epoch, steps_per_epoch, steps_per_epoch, epoch_loss, epoch_psnr, f"stage {model.stage}",
                            final=not progress.tty or epoch + 1 == E)
            last = snapshot()
            if rank == 0 and (time.time() - last_write >= cfg.checkpoint_seconds or epoch + 1 == E):
                save_atomic(last, ckpt_path)
                last_write = time.time()
            took, left = state["history"][-1]["seconds"], E - epoch - 1
            if left and (epoch == first or epoch == E1 > first):  # the duration, as soon as it can be told
                whole = "the whole run" if epoch == 0 else f"the {plural(left, 'epoch')} left"
                later = f"; stage 2's epochs are slower, a new estimate after epoch {E1 + 1}" if epoch < E1 < E else ""
                progress.say(f"epoch {epoch + 1}/{E}{', the first of stage 2,' if epoch == E1 else ''} took {took:.3g} s: "
                             f"about {hms(took * (left + (epoch == 0)))} for {whole}{later}")
        if model.stage == 1:  # fewer epochs than stage 1 needs: still end with the stage-2 model
            optimizer = stage_switch(model, optimizer, state, device, progress.say)
            last = snapshot()
            if rank == 0:
                save_atomic(last, ckpt_path)
    except KeyboardInterrupt:
        if rank == 0:
            save_atomic(last, ckpt_path)  # the last finished epoch, never a half-updated model
        progress.end_line()
        raise KeyboardInterrupt(f"interrupted at epoch {last['state']['epoch']}/{E}") from None
    return model, state


def stage_switch(model, optimizer, state, device, log):
    """End of stage 1: divergence (Eq. 4), Algorithm 1 (or an ablation's rule), K copies."""
    cfg = model.cfg
    D = divergence(model.all_temporal_features())
    if dist.is_initialized():  # torchrun: rank 0's D for all, so that no float rounding gives a process other GoPs
        dist.broadcast(D, 0)
    if cfg.ablation == "V4":
        boundaries = fixed_length_gops(cfg.n_frames, cfg.gops)
    elif cfg.ablation == "V5":
        boundaries = equal_gops(cfg.n_frames, cfg.gops)
    else:
        boundaries = partition_gops(D.tolist(), cfg.gops, cfg.min_gop)
    state["divergence"], state["boundaries"] = D.tolist(), boundaries
    log(f"stage 2: {plural(cfg.gops, 'GoP')} starting at frame{'s' if boundaries else ''} {', '.join(map(str, [0] + boundaries))}")
    return split_model(model, optimizer, boundaries, device)


# -----------------------------------------------------------------------------
# Command line

def make_parser():
    d = TeNeRVConfig()
    p = argparse.ArgumentParser(description="Train a TeNeRV model on a video and report its quality.")
    p.add_argument("--frames", help="folder of PNG/JPEG frames, a raw 8-bit YUV 4:2:0 .yuv file or a .y4m file (required "
                   "unless --synthetic)")
    p.add_argument("--size", default=None, help="WxH of a .yuv file, pixels (default: a _WxH in its name)")
    p.add_argument("--matrix", type=int, default=DEFAULT_MATRIX, choices=tuple(MATRICES),
                   help="colour matrix of a .yuv/.y4m file: BT.601 or BT.709 (default: %(default)s)")
    p.add_argument("--params", default=f"{d.params / 1e6:g}M", help="parameters of the final model, e.g. 3M, 0.3M, 300K (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="total epochs of both stages (default: %(default)s)")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                   help="stage-1 epochs per 300 of --epochs; not in the paper (default: %(default)s)")
    p.add_argument("--l1-epochs", type=int, default=d.l1_epochs,
                   help="L1-only epochs per 300 of --epochs; the paper's Sec. IV-A: 30 (default: %(default)s)")
    p.add_argument("--gops", type=int, default=d.gops, help="K, number of GoPs (default: T/16, 1 to 8, fewer if the copies would take > 5%% of --params)")
    p.add_argument("--min-gop", type=int, default=d.min_gop, help="L_min of Algorithm 1, frames (default: T/(2K))")
    p.add_argument("--window", type=int, default=d.window, help="l, IFF window, frames (Eq. 2) (default: %(default)s)")
    p.add_argument("--strides", default="", help="upsampling strides, e.g. 5,2,2 (default: chosen from the frame size)")
    p.add_argument("--depths", default="", help="refinement units per block, block 0 first, e.g. 1,3,1 (default: 3 in "
                   "the blocks between grid and full resolution, 1 in the others)")
    p.add_argument("--expansions", default="", help="MLP width / channels per block, e.g. 4,4,1 (default: 4, 1 at full "
                   "resolution)")
    p.add_argument("--ablation", default="full", choices=("full",) + ABLATIONS,  # "full" is the config's ""
                   help="the full TeNeRV or a variant of Table III (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="frames per training step (default: %(default)s)")
    p.add_argument("--patches", type=int, default=d.patches,
                   help="train on patches: each step takes --batch-size frames' worth of random (frame, patch) pairs, "
                        f"P patches per frame; 1 = whole frames; 0 = 2 if the median PSNR between consecutive frames "
                        f"is below {FAST_MOTION_PSNR:g} dB (fast motion, cuts), else 1 (not in the paper; default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak Adam learning rate (default: %(default)s)")
    p.add_argument("--beta2", type=float, default=d.beta2, help="Adam's second-moment decay; not in the paper "
                   "(default: %(default)s; PyTorch's default is 0.999)")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="clip the gradient's global norm to this "
                   "before each step; 0 = off; not in the paper (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<frames name>_<params>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="train anew even if --out holds a run, overwriting it")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to train (default: %(default)s)")
    p.add_argument("--save-frames", action="store_true", help="write the reconstruction to RUN/frames/")
    p.add_argument("--dry-run", action="store_true", help="print the configuration and parameter count, then exit")
    # the speed benchmark (issue 25): bench.speed; trains no run, writes no run folder
    p.add_argument("--bench", action="store_true", help="time training steps of both stages and decoding, count MACs "
                   "per pixel, project the training time; --out FILE.json keeps the figures")
    p.add_argument("--synthetic", metavar="WxHxT", help="with --bench or --dry-run: T random frames of WxH pixels "
                   "instead of --frames, e.g. 1920x1080x600")
    p.add_argument("--bench-steps", type=int, default=5, metavar="N", help="timed training steps per stage and "
                   "decoding batches of --bench, after warm-up (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="with --bench: torch.compile the model and training step "
                   "(falls back to eager, with a message, if compiling fails)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    out_given = args.out is not None
    quiet = os.environ.get("RANK", "0") != "0"  # torchrun started N copies of this: rank 0 speaks for all
    launcher = f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}" if "WORLD_SIZE" in os.environ else "python"
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(1 if quiet else f"error: {e}")
    except KeyboardInterrupt as e:  # one line, no traceback: how to go on
        if quiet:
            sys.exit(130)
        what = e.args[0] if e.args else "interrupted"  # train() says at which epoch
        if args.out and os.path.exists(os.path.join(args.out, "ckpt.pt")) and (e.args or not args.force):
            again = [a for a in argv if a != "--force"] + ([] if out_given else ["--out", args.out])
            again += [] if args.resume else ["--resume"]
            what += f"; continue with: {launcher} {shlex.join([os.path.relpath(__file__)] + again)}"
        print(what, file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def int_list(flag, text, example):
    """'5,2,2' -> (5, 2, 2); '' -> () (derived). Every entry at least 1."""
    try:
        values = tuple(int(s) for s in text.split(",")) if text else ()
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected integers separated by commas, e.g. {example}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} {text}: every entry must be at least 1")
    return values


def check_writable(path, flag, folder):
    """Fail now, not after training: `path`, a folder (made if missing) or a file, can be written."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{flag} {path}: is a {'file' if folder else 'folder'}; pass {'a folder' if folder else 'a file name'}")
    where = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    if not folder and not os.path.isdir(where):
        raise ValueError(f"{flag} {path}: the folder {os.path.dirname(path)} does not exist; create it or write elsewhere")
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not (os.path.isdir(where) and os.access(where, os.W_OK | os.X_OK)):
        raise ValueError(f"{flag} {path}: cannot write in {where}; pass another {flag}")


def describe(cfg):
    """The configuration read for people: what --params chose and what training will do."""
    with torch.device("meta"):  # shapes only
        model, one_gop = TeNeRV(cfg, stage=2), TeNeRV(replace(cfg, gops=1), stage=2)
    n = {key: sum(p.numel() for name, p in one_gop.named_parameters() if name.startswith(key))
         for key in ("grids.", "gop_grid", "iff.", "")}  # "": all
    total, K, S = count_params(cfg), cfg.gops, math.prod(cfg.strides)
    E, E1, E_l1 = cfg.epochs, min(cfg.epochs, stage1_epochs(cfg)), min(cfg.epochs, l1_only_epochs(cfg))

    def csv(xs):
        return ", ".join(map(str, xs))

    def epochs(a, b):  # epochs a..b, 1-based
        return plural(b - a + 1, "epoch") + (f" ({a}-{b})" if b > a else f" ({a})" if b == a else "")

    crop = f", cropped to {cfg.width}x{cfg.height}" if (cfg.base_w * S, cfg.base_h * S) != (cfg.width, cfg.height) else ""
    return [f"grid: {cfg.base_w}x{cfg.base_h} cells, strides {csv(cfg.strides)} (x{S}) to {cfg.base_w * S}x{cfg.base_h * S}{crop}",
            f"grid levels: {len(model.grids.levels)} over T + l - 1 = {model.grids.n_positions} positions ({cfg.grid_stride} "
            f"per finest cell): {csv(g.shape[0] for g in model.grids.levels)} cells in time, "
            f"{csv(g.shape[1] for g in model.grids.levels)} channels",
            f"blocks: channels {' -> '.join(map(str, block_dims(cfg)))}, depths {csv(cfg.depths)}, MLP expansions {csv(cfg.expansions)}",
            f"GoPs: K = {K}, L_min = {plural(cfg.min_gop, 'frame')}, IFF window l = {model.window}"
            + (f", ablation {cfg.ablation} (Table III)" if cfg.ablation else ""),
            f"stage 1: {epochs(1, E1)}, one GoP for all frames",
            f"stage 2: {epochs(E1 + 1, E)}, {plural(K, 'GoP')}" + ("" if E > E1 else " (raise --epochs to train it)"),
            (f"loss: L1 for {epochs(1, E_l1)}, then " if E_l1 else "loss: ")
            + f"{cfg.l1_weight} L1 + {cfg.msssim_weight} (1 - MS-SSIM)",
            f"optimiser: Adam (beta2 {cfg.beta2:g}), peak lr {cfg.lr:g} (grids x{cfg.grid_lr:g}), {cfg.warmup:.0%} warm-up then cosine, "
            + (f"gradient norm clipped to {cfg.clip_grad:g}, " if cfg.clip_grad > 0 else "")
            + f"{plural(cfg.batch_size, 'frame')} per step" + (f" as {cfg.batch_size * cfg.patches} random patches "
            f"(1/{cfg.patches} of a frame each)" if cfg.patches > 1 else "") + f", seed {cfg.seed}",
            f"size: base grids {n['grids.']} + GoP grid {n['gop_grid']} + IFF windows {n['iff.']} + network "
            f"{n[''] - n['grids.'] - n['gop_grid'] - n['iff.']}" + (f" + copies for {plural(K - 1, 'more GoP')} "
                                                                   f"{total - n['']}" if K > 1 else "") + f" (--params {cfg.params})",
            f"parameters: {total}"]


def run(args):
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.patches < 0:
        raise ValueError(f"--patches {args.patches}: must be 0 (chosen from the frames), 1 (whole frames) or more")
    if not args.clip_grad >= 0:  # also NaN
        raise ValueError(f"--clip-grad {args.clip_grad}: must be 0 (off) or more, e.g. 1.0")
    if not 0 <= args.beta2 < 1:
        raise ValueError(f"--beta2 {args.beta2}: Adam's second-moment decay must be in [0, 1), e.g. 0.99")
    for flag, n in (("--pretrain-epochs", args.pretrain_epochs), ("--l1-epochs", args.l1_epochs)):
        if not 0 <= n <= 300:
            raise ValueError(f"{flag} {n}: epochs per 300 of --epochs, between 0 and 300")
    strides, depths, expansions = (int_list(flag, text, example) for flag, text, example in (
        ("--strides", args.strides, "5,2,2"), ("--depths", args.depths, "1,3,1"), ("--expansions", args.expansions, "4,4,1")))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available; use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    device = start_distributed(device)  # torchrun: join the other processes, take GPU LOCAL_RANK
    rank, world = rank_and_world()
    log = print if rank == 0 else (lambda *a: None)  # torchrun: rank 0 prints for all
    ablation = "" if args.ablation == "full" else args.ablation
    if args.bench or args.synthetic or args.compile:  # the speed benchmark lives in bench.py (issue 25)
        import bench
        frames, (T, H, W) = bench.speed_frames(args)  # checks its flags; None for --synthetic
    else:
        if args.frames is None:
            raise ValueError("--frames: missing; pass a folder of PNG/JPEG frames, a .yuv or a .y4m file")
        name = os.path.basename(os.path.normpath(args.frames)).split(".")[0]
        args.out = args.out or os.path.join("runs", f"{name}_{args.params}{'_' + ablation if ablation else ''}")
        ckpt = os.path.join(args.out, "ckpt.pt")
        if not args.dry_run:  # the run folder, now rather than after loading the frames
            check_writable(args.out, "--out", folder=True)
            if args.resume and not os.path.exists(ckpt):
                raise FileNotFoundError(f"{ckpt}: no checkpoint to resume; run without --resume to start")
            if os.path.exists(ckpt) and not (args.resume or args.force):
                done = os.path.exists(os.path.join(args.out, "metrics.json"))
                raise ValueError(f"--out {args.out}: holds a {'finished' if done else 'started'} run; continue it with "
                                 f"--resume, pass a new --out, or add --force to overwrite it")
        frames = load_frames(args.frames, args.size, args.matrix)
        T, _, H, W = frames.shape
    cfg = size_model(TeNeRVConfig(
        n_frames=T, height=H, width=W, params=parse_params(args.params),
        strides=strides, depths=depths, expansions=expansions,
        gops=args.gops, min_gop=args.min_gop, window=args.window, ablation=ablation,
        epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, l1_epochs=args.l1_epochs,
        batch_size=args.batch_size, patches=args.patches, lr=args.lr, beta2=args.beta2,
        clip_grad=args.clip_grad, seed=args.seed))
    log(f"video: {plural(T, 'frame')} of {W}x{H} from {args.frames or 'random frames (--synthetic)'}")
    log("\n".join(describe(cfg)))
    if cfg.patches == 0 and frames is not None:  # --synthetic: no frames to look at, so whole frames
        change = frame_change(frames)
        P = choose_patches(cfg, frames, change)
        log(f"patches: {P} per frame, from the frames: median PSNR between consecutive frames {change:.1f} dB "
            f"{'<' if P > 1 else '>='} {FAST_MOTION_PSNR:g}{' (fast motion, cuts)' if P > 1 else ''}; --patches sets it")
    if world > 1:
        log(f"torchrun: world_size {world}, {world} processes x {plural(cfg.batch_size, 'frame')} = {world * cfg.batch_size} per step")
    if args.dry_run:
        return
    if args.bench:
        figures = bench.speed(cfg, frames, device, compile=args.compile, steps=args.bench_steps)
        bench.print_speed(figures)
        if args.out:
            write_json_atomic(figures, args.out)
        return
    log(f"run folder: {args.out}  device: {device}")
    if rank == 0 and args.force and not args.resume and os.path.exists(os.path.join(args.out, "metrics.json")):
        os.remove(os.path.join(args.out, "metrics.json"))  # the old run's: it no longer describes ckpt.pt
    metrics = fit(cfg, frames, args.out, device, frames_path=args.frames, size=args.size, resume=args.resume,
                  save=args.save_frames, matrix=args.matrix if os.path.isfile(args.frames) else None, log=log)
    if rank == 0:  # the others have no metrics
        print(f"PSNR {metrics['psnr']:.2f} dB  MS-SSIM {metrics['msssim']:.4f}  params {metrics['params']}  "
              f"{metrics['seconds_per_epoch']:.1f} s/epoch  decode {metrics['decode_fps']:.1f} frames/s  -> {args.out}/metrics.json")


def fit(cfg, frames, out, device, frames_path=None, size=None, resume=False, save=False, log=print, matrix=None):
    """Train, evaluate, write out/metrics.json (and out/frames/ if save); returns the metrics. frames_path,
    size and matrix (of a .yuv/.y4m file) go into the metrics, for compress.py to read the frames again."""
    T, _, H, W = frames.shape
    model, state = train(cfg, frames, out, device, resume=resume, log=log)
    rank, world = rank_and_world()
    if rank > 0:  # torchrun: rank 0 evaluates and writes metrics.json while the others wait
        dist.barrier()
        return None
    p, m, fps, recon = evaluate(model, frames, device)
    metrics = dict(params=count_params(cfg), psnr=p.mean().item(), psnr_per_frame=p.tolist(), msssim=m,
                   msssim_scales=msssim_scales(H, W), gop_boundaries=state["boundaries"],
                   divergence=state["divergence"], epochs=state["epoch"], train_seconds=state["train_seconds"],
                   seconds_per_epoch=state["train_seconds"] / max(1, len(state["history"])),
                   decode_fps=fps, device=str(device), world_size=world, patches=state.get("patches", cfg.patches),
                   history=state["history"], config=asdict(cfg),
                   frames=frames_path and os.path.abspath(frames_path), size=size, matrix=matrix)
    write_json_atomic(metrics, os.path.join(out, "metrics.json"))
    if save:
        save_frames(recon, os.path.join(out, "frames"))
    if world > 1:
        dist.barrier()
    return metrics


if __name__ == "__main__":
    main()
