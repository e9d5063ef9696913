"""Tests for bench.py: a tiny suite end to end, reuse of finished runs, --report-only, bad input."""
import csv
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench  # noqa: E402
from test_tenerv import sample_frames, write_frames  # noqa: E402

TINY = ["--models", "full,V1", "--seeds", "0", "--params", "8K", "--epochs", "2", "--jobs", "2",
        "--extra", "--strides 2,2"]


def tiny_suite(tmp_path):
    """Two clips of 6 frames at 64x36 (the sample's first frames, and the same played backwards)."""
    frames = sample_frames(6).permute(0, 2, 3, 1).numpy()
    write_frames(str(tmp_path / "clips" / "a"), frames)
    write_frames(str(tmp_path / "clips" / "b"), frames[::-1])
    return ["--clips", f"a,b={tmp_path / 'clips' / 'b'}", "--clips-dir", str(tmp_path / "clips"),
            "--out", str(tmp_path / "suite"), *TINY]


def test_tiny_suite_runs_reuses_and_reports(tmp_path, capsys):
    argv = tiny_suite(tmp_path)
    bench.main(argv)
    out = capsys.readouterr().out
    assert out.count("run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ") == 4 and "--ablation V1" in out
    suite = tmp_path / "suite"
    with open(suite / "suite.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["clip"], r["model"], r["seed"]) for r in rows] == [("a", "full", "0"), ("a", "V1", "0"),
                                                                  ("b", "full", "0"), ("b", "V1", "0")]
    assert all(r["epochs"] == "2" and 7000 < int(r["params"]) < 9000 for r in rows)
    for clip in "ab":
        for model in ("full", "V1"):
            assert (suite / clip / f"{model}_s0" / "log.txt").read_text().startswith("$ OMP_NUM_THREADS=1 ")
    # the paired delta full - V1 in suite.md is the one of the two metrics.json
    full, v1 = (json.loads((suite / "a" / f"{m}_s0" / "metrics.json").read_text()) for m in ("full", "V1"))
    assert v1["config"]["ablation"] == "V1" and full["config"]["strides"] == [2, 2]
    md = (suite / "suite.md").read_text()
    section = md[md.index("## a:"):md.index("## b:")]
    v1_row = next(line for line in section.splitlines() if line.startswith("| V1 |")).split(" | ")
    assert float(v1_row[6]) == pytest.approx(full["psnr"] - v1["psnr"], abs=0.006)
    assert float(v1_row[1]) == pytest.approx(v1["psnr"], abs=0.006)
    assert rows[0]["patches"] == str(full["patches"]) and full["patches"] in (1, 2)  # chosen from the frames
    assert f"trained on {full['patches']} patch" in section
    assert "HiNeRV" not in md  # other protocol and clip names: no reference rows
    assert "python bench.py --clips" in md and "torch" in md

    # a second invocation trains nothing
    start = time.time()
    bench.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing ") == 4 and "run: " not in out and time.time() - start < 5

    # a run with a checkpoint but no metrics.json is resumed, not started again
    os.remove(suite / "b" / "V1_s0" / "metrics.json")
    bench.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing ") == 3 and out.count("resume: ") == 1 and "--resume" in out
    assert (suite / "b" / "V1_s0" / "metrics.json").exists()
    assert (suite / "b" / "V1_s0" / "log.txt").read_text().count("$ OMP_NUM_THREADS=1") == 2

    # --report-only rebuilds the tables from finished runs and leaves out the others
    os.remove(suite / "suite.csv")
    bench.main([*argv, "--models", "full,V1,V2", "--report-only"])
    out = capsys.readouterr().out
    assert "run: " not in out and "4 of 6 runs in the tables" in out
    with open(suite / "suite.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "Not finished" in (suite / "suite.md").read_text()

    # a finished run of another protocol is left alone, never overwritten
    before = (suite / "a" / "full_s0" / "metrics.json").read_text()
    msg = cli_error([*argv, "--clips", "a", "--models", "full", "--epochs", "3"])
    assert "1 run(s) failed or were left alone" in msg
    assert "finished with other settings (epochs 2, not 3)" in capsys.readouterr().out
    assert (suite / "a" / "full_s0" / "metrics.json").read_text() == before

    # a run made before a default changed (here: Adam's beta2 0.999, before the field existed) is not reused
    # under the new default, and neither is one made with another learning rate
    meta = suite / "b" / "full_s0" / "metrics.json"
    old = json.loads(meta.read_text())
    del old["config"]["beta2"]
    meta.write_text(json.dumps(old))
    (suite / "a" / "V1_s0" / "metrics.json").write_text(
        json.dumps({**v1, "config": {**v1["config"], "lr": v1["config"]["lr"] / 2}}))
    msg = cli_error(argv)
    assert "2 run(s) failed or were left alone" in msg
    out = capsys.readouterr().out
    assert "finished with other settings (beta2 None, not 0.99)" in out and "(lr 0.005, not 0.01)" in out


def test_failed_run_is_reported(tmp_path, capsys):
    argv = tiny_suite(tmp_path)
    msg = cli_error([*argv, "--clips", "a", "--models", "full", "--extra", "--strides 2,2 --gops 9"])
    assert "1 run(s) failed" in msg
    out = capsys.readouterr().out
    assert "FAILED" in out and "log.txt, last lines:" in out and "error: --gops 9" in out


def test_reference_rows_only_under_their_protocol(tmp_path):
    argv = tiny_suite(tmp_path)
    os.rename(tmp_path / "clips" / "a", tmp_path / "clips" / "bikes64")
    for params, epochs, shown in (("0.3M", "50", True), ("300K", "50", True), ("0.3M", "40", False)):
        bench.main([*argv, "--clips", "bikes64", "--params", params, "--epochs", epochs, "--report-only"])
        md = (tmp_path / "suite" / "suite.md").read_text()
        assert ("| HiNeRV (its public code, reference) | | 35.20 |" in md) == shown
        assert ("| HNeRV (its public code, reference) | | 30.22 |" in md) == shown


def cli_error(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_input_is_one_line(tmp_path):
    argv = tiny_suite(tmp_path)
    assert "not a folder" in cli_error([*argv, "--clips", f"x={tmp_path / 'nope'}"])
    assert "make_clips.py" in cli_error([*argv, "--clips", "bikes64"])
    assert "--models" in cli_error([*argv, "--models", "full,V9"])
    assert "--seeds" in cli_error([*argv, "--seeds", "0,x"])
    assert "sets --frames" in cli_error([*argv, "--extra", "--seed 3"])
    assert "no flag --nope" in cli_error([*argv, "--extra", "--nope 1"])
