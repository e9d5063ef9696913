"""Tests for more than one process (torchrun, gloo on the CPU) and for a corpus of clips (xargs, a SLURM
array). Each launches Python processes, so each takes several seconds."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tenerv  # noqa: E402
from test_tenerv import sample_frames, write_frames  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 5 frames: a step holds 2 frames, so the last step of an epoch leaves rank 1 without a frame;
# stage 1 is epochs 1-2, stage 2 epochs 3-4 with K = 2 GoPs
TINY = ["--params", "8K", "--strides", "2,2", "--gops", "2", "--epochs", "4", "--pretrain-epochs", "150"]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one video, two processes ----------------------------------------------------------------------

@pytest.mark.parametrize("patches", [1, 2])
def test_two_processes_of_one_frame_train_like_one_process_of_two(tmp_path, patches):
    """torchrun, 2 processes x --batch-size 1 = 1 process x --batch-size 2: the same frames (--patches 2: the
    same (frame, patch) pairs) in each step,
    the gradients averaged, the same GoPs, so the same weights (up to float rounding: a sum over 2 frames
    in another order, which Adam magnifies where a gradient is near 0) through the stage switch."""
    clip = write_frames(str(tmp_path / "clip"), sample_frames(5, size=(40, 24)).permute(0, 2, 3, 1).numpy())
    TINY_P = TINY + ["--patches", str(patches)]
    one = subprocess.run([sys.executable, "tenerv.py", "--frames", clip, *TINY_P, "--batch-size", "2",
                          "--out", str(tmp_path / "one")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "tenerv.py", "--frames", clip, *TINY_P, "--batch-size", "1", "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("video: 5 frames") == 1 and two.stdout.count("PSNR") == 1  # rank 0 prints for all
    assert "torchrun: world_size 2, 2 processes x 1 frame = 2 per step" in two.stdout
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("one", "two"))
    assert a["stage"] == b["stage"] == 2 and a["state"]["boundaries"] == b["state"]["boundaries"]
    (cut,) = a["state"]["boundaries"]  # [1] with whole frames
    # the test covers a step whose frames sit in different GoPs
    orders = [torch.randperm(5 * patches, generator=torch.Generator().manual_seed(e)) // patches for e in (2, 3)]  # seed 0: epochs 3, 4
    assert any(len(set((s < cut).tolist())) == 2 for order in orders for s in order.split(2 * patches))
    for name, w in a["model"].items():
        assert torch.allclose(w, b["model"][name], rtol=0, atol=1e-4), (name, (w - b["model"][name]).abs().max())
    for x, y in zip(a["state"]["history"], b["state"]["history"]):  # the loss over all 5 frames, from both ranks
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["psnr"] - y["psnr"]) < 1e-3, (x, y)
    ma, mb = (json.load(open(tmp_path / run / "metrics.json")) for run in ("one", "two"))
    assert (ma["world_size"], mb["world_size"]) == (1, 2) and abs(ma["psnr"] - mb["psnr"]) < 1e-3


def _worker(rank, port, cfg, frames, folder):
    """Rank `rank` of 2, started as torchrun would: a full run, a run interrupted in stage 2 on both ranks,
    and its resumption; each rank writes its models for the parent to compare."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    cpu = tenerv.start_distributed(torch.device("cpu"))
    quiet = lambda *a: None  # noqa: E731
    full, _ = tenerv.train(cfg, frames, os.path.join(folder, "a"), cpu, log=quiet)
    real_lr_at = tenerv.lr_at

    def interrupt(step, n_steps, c):  # Ctrl-C on every rank at the second step of epoch 4 (2 steps an epoch)
        if step == 3 * 2 + 1:
            raise KeyboardInterrupt
        return real_lr_at(step, n_steps, c)

    tenerv.lr_at = interrupt
    try:
        tenerv.train(cfg, frames, os.path.join(folder, "b"), cpu, log=quiet)
        raise AssertionError("not interrupted")
    except KeyboardInterrupt:
        pass
    tenerv.lr_at = real_lr_at
    dist.barrier()  # rank 0 has written b/ckpt.pt
    ckpt = torch.load(os.path.join(folder, "b", "ckpt.pt"), weights_only=True)
    assert ckpt["state"]["epoch"] == 3 and ckpt["stage"] == 2
    resumed, _ = tenerv.train(cfg, frames, os.path.join(folder, "b"), cpu, resume=True, log=quiet)
    torch.save(dict(full=full.state_dict(), resumed=resumed.state_dict()), os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_uneven_last_step_and_resume_under_torchrun(tmp_path):
    """7 frames, 2 processes x 2 frames a step: the last step of each epoch gives rank 0 two frames and rank 1
    one, and the weighted losses still make the step that of 1 process x 4 frames. Every rank loads the
    checkpoint (model, Adam moments, epoch): resumed after Ctrl-C in stage 2, the 2 processes end where 2
    uninterrupted ones end, and both ranks hold the same weights."""
    frames = sample_frames(7, size=(40, 24))
    cfg = tenerv.size_model(tenerv.TeNeRVConfig(n_frames=7, height=24, width=40, params=8000, strides=(2, 2), gops=2,
                                                min_gop=1, epochs=5, pretrain_epochs=120, batch_size=2,
                                                checkpoint_seconds=1e9))
    mp.spawn(_worker, args=(free_port(), cfg, frames, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    one, _ = tenerv.train(replace(cfg, batch_size=4), frames, str(tmp_path / "one"), torch.device("cpu"),
                          log=lambda *a: None)
    for name, w in one.state_dict().items():
        assert torch.allclose(w, r0["full"][name], rtol=0, atol=1e-4), (name, (w - r0["full"][name]).abs().max())
        assert torch.allclose(r0["full"][name], r0["resumed"][name], atol=1e-6), name
        assert torch.equal(r0["resumed"][name], r1["resumed"][name]), name  # rank 1 loaded it too


# --- a corpus of clips: one independent run per clip --------------------------------------------------

TINY_RUN = "--params 8K --strides 2,2 --epochs 2"


def readme_command(start):
    """The command in README.md that begins with `start`, to the end of its code block, lines joined."""
    text = open(os.path.join(REPO, "README.md")).read()
    i = text.index(start)
    return text[i:text.index("\n```", i)].replace("\\\n", " ")


def test_a_corpus_with_xargs_and_a_slurm_array(tmp_path):
    """The README's xargs line on two clips (one with a space in its name), two runs at once, each in its own
    folder. The SLURM array script picks a clip by SLURM_ARRAY_TASK_ID and resumes a started run (a
    checkpoint, no metrics yet) rather than refusing it."""
    for name, start in (("clip a", 0), ("clip-b", 4)):
        write_frames(str(tmp_path / "clips" / name), sample_frames(8, size=(40, 24))[start:start + 3].permute(0, 2, 3, 1).numpy())
    os.symlink(os.path.join(REPO, "tenerv.py"), tmp_path / "tenerv.py")  # the recipes run in the repository root
    run_env = dict(env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # `python`: this one
    xargs = readme_command("printf '%s\\0' clips/*").replace("--params 0.3M", TINY_RUN)
    r = subprocess.run(["sh", "-c", xargs], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = tmp_path / "runs" / "corpus"
    for name in ("clip a", "clip-b"):
        m = json.load(open(runs / name / "metrics.json"))
        assert m["epochs"] == 2 and m["frames"] == str(tmp_path / "clips" / name)
    os.remove(runs / "clip-b" / "metrics.json")
    script = open(os.path.join(REPO, "docs", "slurm_corpus.sh")).read().replace("--params 0.3M", TINY_RUN)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=dict(run_env, SLURM_ARRAY_TASK_ID="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming runs/corpus/clip-b at epoch 2/2" in r.stdout and os.path.exists(runs / "clip-b" / "metrics.json")
