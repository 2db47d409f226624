"""Reliability: SIGKILL at random steps then --resume equals an uninterrupted run; torn checkpoints are
passed over; the same seed gives the same loss curve; a NaN names the last good checkpoint."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO


def ft_command(folder_data, tiny_model, out, *extra):
    return [sys.executable, str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", folder_data,
            "--model", tiny_model, "--steps", "10", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "0",
            "--ckpt-every", "2", "--out", str(out), *extra]


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def logged_steps(out) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def kill_at(cmd, cwd, out, step: int):
    """Starts the run and SIGKILLs it once its log shows `step` finished steps."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 240
    while logged_steps(out) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return logged_steps(out)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, folder_data, tiny_model):
    run(ft_command(folder_data, tiny_model, tmp_path / "straight"), tmp_path)
    straight = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)["model"]
    kill_steps = random.Random(os.getpid()).sample(range(1, 10), 3)
    for k in kill_steps:
        out = tmp_path / f"killed{k}"
        kill_at(ft_command(folder_data, tiny_model, out), tmp_path, out, k)
        assert not (out / "final.pt").exists(), f"the run finished before the kill at step {k}"
        saved = any((out / "ckpt").glob("step_*.pt"))  # the kill may land between a step's log line and its checkpoint
        resumed = run(ft_command(folder_data, tiny_model, out, "--resume"), tmp_path)
        assert ("resuming from" in resumed.stdout) == saved
        final = torch.load(out / "final.pt", weights_only=False)["model"]
        for name in straight:
            assert torch.equal(straight[name], final[name]), f"kill at step {k}: {name} differs"


def test_resume_passes_over_a_torn_checkpoint(tmp_path, folder_data, tiny_model):
    out = tmp_path / "run"
    run(ft_command(folder_data, tiny_model, out, "--steps", "4", "--keep-checkpoints"), tmp_path)
    ckpt = out / "ckpt"
    good = ckpt / "step_2.pt"
    assert good.exists()
    (ckpt / "step_3.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a torn write
    (ckpt / "step_4.pt.tmp").write_bytes(b"half")  # a temp file left by a kill mid-save
    os.remove(out / "final.pt")
    proc = run(ft_command(folder_data, tiny_model, out, "--steps", "4", "--resume"), tmp_path)
    assert "step_3.pt is unreadable" in proc.stdout
    assert "resuming from" in proc.stdout and "step_2.pt" in proc.stdout


DRIVER_INTERRUPTED_EVAL = """
import sys
sys.path.insert(0, sys.argv[1])
import baselines, common
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while the test splits are scored
common.evaluate_task = interrupted
baselines.main(sys.argv[2:])
"""


def test_ctrl_c_in_the_final_evaluation_then_resume_evaluates_without_training(tmp_path, folder_data, tiny_model):
    """A run is finished when its rows are written: Ctrl-C during the final evaluation says how to go on
    (no traceback), --resume evaluates final.pt without training again, and a third --resume is refused."""
    out = tmp_path / "run"
    cmd = ft_command(folder_data, tiny_model, out, "--steps", "4")
    (tmp_path / "driver.py").write_text(DRIVER_INTERRUPTED_EVAL)
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(REPO), *cmd[2:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "interrupted during the final evaluation" in proc.stderr and "--resume" in proc.stderr
    assert (out / "final.pt").is_file() and not (out / "results.jsonl").exists()
    weights, log = torch.load(out / "final.pt", weights_only=False)["model"], (out / "log.jsonl").read_text()
    resumed = run(ft_command(folder_data, tiny_model, out, "--steps", "4", "--resume"), tmp_path)
    assert "holds the trained weights: evaluating them" in resumed.stdout
    assert (out / "log.jsonl").read_text() == log  # no step trained again
    again = torch.load(out / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert {json.loads(x)["split"] for x in (out / "results.jsonl").read_text().splitlines()} == {"test", "sketch"}
    assert {json.loads(x)["step"] for x in (out / "results.jsonl").read_text().splitlines()} == {4}
    assert not list((out / "ckpt").glob("step_*.pt"))  # finished: its step checkpoints are gone
    third = subprocess.run(ft_command(folder_data, tiny_model, out, "--steps", "4", "--resume"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert third.returncode != 0 and "is finished" in third.stderr and "Traceback" not in third.stderr


def test_same_seed_same_loss_curve(tmp_path, folder_data, tiny_model):
    curves = []
    for name in ("a", "b"):
        run(ft_command(folder_data, tiny_model, tmp_path / name, "--steps", "5"), tmp_path)
        curves.append([json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    assert curves[0] == curves[1] and len(curves[0]) == 5
    run(ft_command(folder_data, tiny_model, tmp_path / "c", "--steps", "5", "--seed", "1"), tmp_path)
    other = [json.loads(line)["loss"] for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert other != curves[0]


def test_nan_names_last_good_checkpoint(tmp_path, folder_data, tiny_model):
    sys.path.insert(0, str(REPO))
    import common

    args = common.make_args(common.TrainArgs, "folder", data_root=folder_data, model=tiny_model, steps=6, batch_size=8,
                            eval_every=0, ckpt_every=2, out=str(tmp_path / "run"))
    env = common.setup(args, "ft")
    common.set_trainable(env.model)

    def loss_fn(model, batch, step):
        loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
        if step >= 3:  # the 4th step diverges
            loss = loss * float("inf")
        return loss, {"ce": loss.detach()}

    with pytest.raises(common.NonFiniteLoss, match=r"step 3 .*step_2\.pt"):
        common.train(env, loss_fn, args)
    assert all(torch.isfinite(p).all() for p in env.model.parameters())  # the step stopped before opt.step


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_stops(tmp_path, folder_data, tiny_model, monkeypatch):
    import errno

    import common

    args = common.make_args(common.TrainArgs, "folder", data_root=folder_data, model=tiny_model, steps=6, batch_size=8,
                            eval_every=0, ckpt_every=2, workers=0, out=str(tmp_path / "run"))
    env = common.setup(args, "ft")
    common.set_trainable(env.model)
    real_save = torch.save

    def save(obj, f):
        if isinstance(obj, dict) and obj.get("step") == 4:  # the disk fills while step 4's checkpoint is written
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    loss_fn = lambda model, batch, step: (torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"]), {})  # noqa: E731
    with pytest.raises(SystemExit, match=r"No space left on device.*step_2\.pt.*--resume"):
        common.train(env, loss_fn, args)
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_2.pt"]  # no torn step_4.pt, no temp file left
    assert torch.load(ckpt / "step_2.pt", weights_only=False)["step"] == 2


WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import common
for i in range(200):
    common.append_lines(Path(sys.argv[2]), "".join('{"writer": %s, "i": %d, "pad": "%s"}\\n' % (sys.argv[3], i, "x" * 3000)
                                                  for _ in range(3)))
"""


def test_many_processes_appending_results_never_tear_a_line(tmp_path):
    out = tmp_path / "results.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(out), str(w)]) for w in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole JSON
    assert len(rows) == 8 * 200 * 3
    assert {(r["writer"], r["i"]) for r in rows} == {(w, i) for w in range(8) for i in range(200)}
    # each append's 3 lines stay together: no writer's line lands inside another's append
    assert all(rows[k]["writer"] == rows[k + 1]["writer"] == rows[k + 2]["writer"] for k in range(0, len(rows), 3))


DIES = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import baselines, common
real_train = common.train


def train(env, loss_fn, args, **kw):
    def dying(model, batch, step):
        if step == 5 and common.dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 is lost mid-run, after the step-4 checkpoint
        return loss_fn(model, batch, step)
    return real_train(env, dying, args, **kw)


baselines.train = train
baselines.main(sys.argv[2:])
"""


def test_a_lost_process_stops_the_other_with_a_message_and_resume_matches(tmp_path, folder_data, tiny_model):
    from conftest import close, run_script

    ft = ["--method", "ft", "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "8",
          "--batch-size", "8", "--eval-every", "0", "--ckpt-every", "2", "--workers", "0"]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
    env = {"OMP_NUM_THREADS": "1"}
    run_script([*torchrun, str(REPO / "baselines.py"), *ft, "--out", str(tmp_path / "straight")], cwd=tmp_path, env_extra=env)
    (tmp_path / "dies.py").write_text(DIES)
    start = time.time()
    proc = run_script([*torchrun, str(tmp_path / "dies.py"), str(REPO), *ft, "--out", str(tmp_path / "cut")], cwd=tmp_path,
                      env_extra=env, check=False)
    took, out = time.time() - start, proc.stdout + proc.stderr
    assert proc.returncode != 0 and took < 60, (took, out[-3000:])
    assert "error: rank 0 lost a process of this run: rank 1 ended" in out, out[-3000:]
    assert f"Last checkpoint: {tmp_path / 'cut' / 'ckpt' / 'step_4.pt'}" in out and "--resume" in out
    run_script([*torchrun, str(REPO / "baselines.py"), *ft, "--out", str(tmp_path / "cut"), "--resume"], cwd=tmp_path,
               env_extra=env)
    a, b = (torch.load(tmp_path / d / "final.pt", weights_only=False)["model"] for d in ("straight", "cut"))
    assert not close(a, b)


ELSEWHERE = """
import os, runpy, sys
script, elsewhere, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if os.environ["RANK"] == "1":  # this process's --out is a folder without rank 0's checkpoints (no shared filesystem)
    argv[argv.index("--out") + 1] = elsewhere
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def test_resume_where_a_process_cannot_see_the_checkpoints_stops_every_process(tmp_path, folder_data, tiny_model):
    """torchrun --resume with rank 1 looking at a folder that lacks rank 0's checkpoints (or final.pt): every
    process stops at once with one message that names each process's start, instead of rank 1 training from
    step 0 under weights broadcast from rank 0."""
    from conftest import run_script

    ft = ["--method", "ft", "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4",
          "--batch-size", "8", "--eval-every", "0", "--ckpt-every", "2", "--workers", "0", "--out", str(tmp_path / "run")]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    env = {"OMP_NUM_THREADS": "1"}
    run_script([*torchrun, str(REPO / "baselines.py"), *ft, "--keep-checkpoints"], cwd=tmp_path, env_extra=env)
    (tmp_path / "run" / "results.jsonl").unlink()  # as if killed before its rows were written
    final = (tmp_path / "run" / "final.pt").rename(tmp_path / "final.pt")  # ... and, first, before final.pt
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere.py").write_text(ELSEWHERE)
    for expected in ("; rank 1: step 0 (no readable checkpoint", "rank 0: final.pt (trained); rank 1: no final.pt"):
        if "final.pt" in expected:  # the second time: final.pt is there, for rank 0 only
            final.rename(tmp_path / "run" / "final.pt")
        start = time.time()
        proc = run_script([*torchrun, str(tmp_path / "elsewhere.py"), str(REPO / "baselines.py"), str(tmp_path / "elsewhere"),
                           *ft, "--resume"], cwd=tmp_path, env_extra=env, check=False)
        took, out = time.time() - start, proc.stdout + proc.stderr
        assert proc.returncode != 0 and took < 60 and 'common.py", line' not in out, (took, out[-3000:])  # torchrun's own traceback only
        assert out.count("error: --resume: the processes of this run found different starts") == 2, out[-3000:]  # each process
        assert expected in out and "Every process must see rank 0's run folder" in out, out[-3000:]


WAITER = """
import sys, time
from pathlib import Path
import torch
import common
common.init_distributed(torch.device("cpu"))
path = Path(sys.argv[1])
if common.is_main_process():
    time.sleep(3)  # rank 0's long job (ARF's faiss search)
    if sys.argv[2] == "fail":
        raise SystemExit("error: rank 0's job failed")
    path.with_suffix(".tmp").write_text("done")
    path.with_suffix(".tmp").replace(path)
common.wait_for_file(path, "rank 0's job")
print(f"rank {common.dist.get_rank()} read {path.read_text()}")
"""


@pytest.mark.parametrize("outcome", ["done", "fail"])
def test_waiting_for_rank_0s_file_is_not_a_collective_and_says_when_rank_0_failed(tmp_path, outcome):
    from conftest import run_script

    (tmp_path / "waiter.py").write_text(WAITER)
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "waiter.py"),
                       str(tmp_path / "result.txt"), outcome], cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    if outcome == "done":
        assert proc.returncode == 0 and "rank 0 read done" in out and "rank 1 read done" in out, out[-3000:]
    else:
        assert proc.returncode != 0 and "error: rank 1 stopped while waiting for rank 0's job" in out, out[-3000:]
