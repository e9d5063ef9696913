"""
video.py: frames in and out, and the quality metrics, shared by tenerv.py, compress.py and rd.py.

Frames come from a folder of PNG/JPEG images, a raw 8-bit YUV 4:2:0 file (.yuv) or a YUV4MPEG2
file (.y4m), as a uint8 tensor (T, 3, H, W) in RGB; PSNR and MS-SSIM score a reconstruction.

    frames = video.load_frames("data/bbb320")               # (16, 3, 180, 320) uint8
    frames = video.load_frames("clip_1920x1080.yuv", matrix=601)
    p, m = video.quality(recon, frames)                     # PSNR per frame, mean MS-SSIM
"""
import os
import pathlib
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim


def write_atomic(path, write):
    """Write path through write(tmp) and a rename, so that a crash or Ctrl-C never leaves half a file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Frames in: PNG/JPEG folders, raw 8-bit YUV 4:2:0 files (.yuv) and YUV4MPEG2 files (.y4m)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MIN_SIDE = 16  # MS-SSIM needs at least one scale: a side > 10 px with an 11-tap window
MATRICES = {601: (0.299, 0.114), 709: (0.2126, 0.0722)}  # (K_R, K_B) of BT.601 and BT.709
DEFAULT_MATRIX = 709  # UVG and the HEVC test clips are BT.709; a .yuv or .y4m file does not say


def natural_key(name):
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def load_frames(path, size=None, matrix=DEFAULT_MATRIX):
    """Frames as a uint8 tensor (T, 3, H, W) in RGB, from a folder of images, a .yuv or a .y4m file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder; pass a folder of PNG/JPEG frames, a .yuv or a .y4m file")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".yuv", ".y4m"):
            raise ValueError(f"{path}: not a folder and not a .yuv file, nor a .y4m one; pass a folder of PNG/JPEG frames, "
                             f"a raw 8-bit YUV 4:2:0 .yuv file or a YUV4MPEG2 .y4m file")
        frames = torch.from_numpy(yuv420_to_rgb(*(load_y4m if ext == ".y4m" else load_yuv420)(path, size), matrix))
    else:
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
        if not names:
            raise ValueError(f"{path}: no .png/.jpg/.jpeg frames found in this folder")
        arrays = []
        for i, name in enumerate(names):
            try:
                with Image.open(os.path.join(path, name)) as im:
                    a = np.asarray(im.convert("RGB"))
            except Exception as e:  # PIL raises many types for broken files
                raise ValueError(f"{path}/{name}: cannot be read as an image ({e.__class__.__name__}); remove or replace it") from None
            if arrays and a.shape != arrays[0].shape:
                h0, w0 = arrays[0].shape[:2]
                raise ValueError(f"{path}/{name}: frame {i} is {a.shape[1]}x{a.shape[0]}, expected {w0}x{h0} like frame 0 ({names[0]})")
            arrays.append(a)
        frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    T, _, H, W = frames.shape
    if min(H, W) < MIN_SIDE:
        raise ValueError(f"{path}: frames are {W}x{H}; both sides must be at least {MIN_SIDE} px")
    return frames


def parse_size(size):
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m:
        raise ValueError(f"--size {size!r}: expected WxH, e.g. 1920x1080")
    return int(m.group(1)), int(m.group(2))


def split_planes(raw, W, H, f):
    """uint8 frames (T, bytes) -> planes Y (T, H, W), U, V (T, H/f, W/f): I420 for f = 2, 4:4:4 for f = 1."""
    n, c = W * H, W * H // f ** 2
    return (raw[:, :n].reshape(-1, H, W), raw[:, n: n + c].reshape(-1, H // f, W // f),
            raw[:, n + c: n + 2 * c].reshape(-1, H // f, W // f))


def load_yuv420(path, size=None):
    """Raw planar 8-bit YUV 4:2:0 (I420), as UVG and HEVC ship -> planes Y, U, V."""
    if size is None:
        m = re.search(r"_(\d+x\d+)", os.path.basename(path))
        if not m:
            raise ValueError(f"{path}: frame size unknown; pass --size WxH or name the file like clip_1920x1080.yuv")
        size = m.group(1)
    W, H = parse_size(size)
    if W % 2 or H % 2 or W == 0 or H == 0:
        raise ValueError(f"--size {size}: 4:2:0 needs an even, non-zero width and height")
    frame_bytes = W * H * 3 // 2
    n_bytes = os.path.getsize(path)
    if n_bytes == 0 or n_bytes % frame_bytes:
        raise ValueError(f"{path}: {n_bytes} bytes is not a whole number of {W}x{H} YUV 4:2:0 frames "
                         f"({frame_bytes} bytes each); check --size")
    return split_planes(np.fromfile(path, dtype=np.uint8).reshape(-1, frame_bytes), W, H, 2)


def load_y4m(path, size=None):
    """YUV4MPEG2 -> planes Y, U, V: a header line 'YUV4MPEG2 W320 H180 F25:1 Ip C420jpeg ...', then per
    frame a line 'FRAME...' and the planes. 8-bit 4:2:0 or 4:4:4, progressive, limited range; the
    header has no colour matrix (the caller's --matrix says it)."""
    raw = pathlib.Path(path).read_bytes()
    fields = raw[: max(0, raw.find(b"\n"))].decode("latin-1").split()
    tags = {f[0]: f[1:] for f in fields[1:]}  # X tags repeat (XYSCSS=420JPEG XCOLORRANGE=LIMITED): read from fields
    C, I, W, H = tags.get("C", "420jpeg"), tags.get("I", "p"), tags.get("W", ""), tags.get("H", "")
    fix = "; convert it: ffmpeg -i IN -vf scale=out_range=tv -pix_fmt yuv420p OUT.y4m"
    if fields[:1] != ["YUV4MPEG2"] or not (W.isdigit() and H.isdigit()):
        raise ValueError(f"{path}: no YUV4MPEG2 header with a width and height (W320 H180)" + fix)
    bits = re.search(r"p(\d+)$", C)
    if C not in ("420", "420jpeg", "420paldv", "420mpeg2", "444") or "XCOLORRANGE=FULL" in fields:
        raise ValueError(f"{path}: C{C}{f' ({bits[1]}-bit)' if bits else ''}{' full range' if 'XCOLORRANGE=FULL' in fields else ''}; "
                         f"this reader takes 8-bit 4:2:0 or 4:4:4 in limited range" + fix)
    if I not in ("p", "?"):
        raise ValueError(f"{path}: interlaced frames (I{I}); deinterlace them: ffmpeg -i IN -vf bwdif=mode=send_frame OUT.y4m")
    W, H, f = int(W), int(H), 1 if C == "444" else 2
    if size and parse_size(size) != (W, H):
        raise ValueError(f"--size {size}: the .y4m header says {W}x{H}; drop --size")
    if W % f or H % f or W == 0 or H == 0:
        raise ValueError(f"{path}: {W}x{H} 4:2:0 frames; this reader needs an even, non-zero width and height")
    frame_bytes, pos, frames = W * H + 2 * (W // f) * (H // f), raw.find(b"\n") + 1, []
    while pos < len(raw):
        start = raw.find(b"\n", pos) + 1  # the planes start after the FRAME line
        if not raw.startswith(b"FRAME", pos) or start == 0 or start + frame_bytes > len(raw):
            raise ValueError(f"{path}: frame {len(frames)} is damaged or cut short (a FRAME line, then {frame_bytes} bytes)")
        frames.append(np.frombuffer(raw, np.uint8, frame_bytes, start))
        pos = start + frame_bytes
    if not frames:
        raise ValueError(f"{path}: the YUV4MPEG2 file holds no frames")
    return split_planes(np.stack(frames), W, H, f)


def yuv420_to_rgb(y, u, v, matrix=DEFAULT_MATRIX):
    """uint8 planes Y (T, H, W), U, V (T, H/2, W/2), limited range, BT.601 or BT.709 -> uint8 RGB
    (T, 3, H, W). U, V of the full size (4:4:4) are taken as they are."""
    f = 1 if u.shape == y.shape else 2
    y = y.astype(np.float32)
    u = u.astype(np.float32).repeat(f, axis=1).repeat(f, axis=2)  # not in the paper: nearest chroma upsampling
    v = v.astype(np.float32).repeat(f, axis=1).repeat(f, axis=2)
    # limited range: Y in [16, 235], Cb/Cr in [16, 240]
    y, u, v = (y - 16) / 219, (u - 128) / 224, (v - 128) / 224
    kr, kb = MATRICES[matrix]
    r, b = y + 2 * (1 - kr) * v, y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    rgb = np.stack([r, g, b], axis=1)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# Quality metrics

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, pytorch-msssim's defaults
SSIM_WINDOW = 11


def msssim_scales(h, w):
    """pytorch-msssim's 5 scales need min side > 160 px; smaller frames use fewer scales."""
    n = 0
    while n < len(MSSSIM_WEIGHTS) and min(h, w) > (SSIM_WINDOW - 1) * 2 ** n:
        n += 1
    return n


def msssim(x, y):
    """MS-SSIM per image (B,) of images in [0, 1], with the scales renormalised for small frames."""
    n = msssim_scales(*x.shape[-2:])
    weights = x.new_tensor(MSSSIM_WEIGHTS[:n]) / sum(MSSSIM_WEIGHTS[:n])
    win = _fspecial_gauss_1d(SSIM_WINDOW, 1.5).to(x).repeat(x.shape[1], 1, 1, 1)
    mcs = []
    for i in range(n):  # the loop of pytorch_msssim.ms_ssim, with n levels instead of 5
        ssim, cs = _ssim(x, y, win=win, data_range=1.0, size_average=False, K=(0.01, 0.03))
        if i < n - 1:
            mcs.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    stack = torch.stack(mcs + [torch.relu(ssim)], dim=0)  # (levels, B, C)
    return torch.prod(stack ** weights.view(-1, 1, 1), dim=0).mean(1)


def psnr(x, y):
    """PSNR in dB per image (B,), RGB in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))



def quality(recon, frames, batch=8):
    """PSNR per frame (T,) and mean MS-SSIM of frames in [0, 1] against uint8 (or [0, 1]) frames,
    a batch of frames at a time (the originals move to recon's device one batch at a time)."""
    p, m = [], []
    for r, f in zip(recon.split(batch), frames.split(batch)):
        f = f.to(r.device).float() / (1 if f.is_floating_point() else 255)
        p.append(psnr(r, f))
        m.append(msssim(r, f))
    return torch.cat(p).cpu(), torch.cat(m).mean().item()



# -----------------------------------------------------------------------------
# Frames out

def save_frames(recon, folder):
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(recon):
        a = (f.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        write_atomic(os.path.join(folder, f"{i + 1:04d}.png"), lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))
