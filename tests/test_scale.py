"""Scale: every method ends with the same weights from 1 process at global batch B, from `--grad-accum 2`
at B, and from `torchrun --nproc_per_node 2` at B (gloo on CPU); FT and FLYP also from two one-process
"nodes" on localhost. For the CE-based methods that is the
mean over the batch split differently; for FLYP and ARF it needs the global-batch InfoNCE
(common.ContrastiveLoss: rows gathered across processes with gradient, open_clip's feature cache under
accumulation)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, DRIVER, METHODS, REPO, close, make_pool, run_script, train_matrix

TWO_NODES = ("ft", "flyp")  # also run as torchrun --nnodes 2 --nproc-per-node 1 on localhost


@pytest.fixture(scope="module")
def finals(tmp_path_factory, tiny_model):
    """final.pt of every method under every configuration, trained once for the module."""
    base = tmp_path_factory.mktemp("scale")
    out, jobs = train_matrix(base, tiny_model, port=29541)
    # two "nodes" of one process each on localhost (static rendezvous), for one CE and one contrastive method
    jobs = [(script, [*argv[:-1], str(base / "2nodes" / Path(argv[-1]).name)]) for script, argv in jobs
            if Path(argv[-1]).name in TWO_NODES]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-endpoint", "127.0.0.1:29543", str(base / "driver.py"),
                               json.dumps(jobs)], cwd=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}) for r in (0, 1)]
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stdout[-2000:] + stderr[-2000:]
    out["2nodes"] = {m: torch.load(base / "2nodes" / m / "final.pt", weights_only=False)["model"] for m in TWO_NODES}
    return out


@pytest.mark.parametrize("config, method", [(c, m) for m in METHODS for c in ("accum2", "torchrun2")]
                         + [("2nodes", m) for m in TWO_NODES])
def test_same_weights_as_one_process(finals, method, config):
    one, other = finals["one"][method], finals[config][method]
    assert set(one) == set(other)
    assert not close(one, other), f"{method} under {config}: {close(one, other)[:4]}"
    moved = [k for k in one if k.startswith("clip.visual") and not torch.equal(one[k], finals["one"]["zeroshot"][k])]
    assert moved or method == "lp", f"{method} did not train its image tower"  # not a comparison of untouched models


def test_lp_leaves_every_frozen_weight_bitwise_at_theta0(finals):
    theta0, lp = finals["one"]["zeroshot"], finals["one"]["lp"]
    assert [k for k in theta0 if not torch.equal(theta0[k], lp[k])] == ["head"]


EVAL = """
import json, sys, torch
import common
common.init_distributed(torch.device("cpu"))
run = common.load_run(sys.argv[1], torch.device("cpu"))
scored, encode = [0], run.model.clip.encode_image
run.model.clip.encode_image = lambda x: scored.__setitem__(0, scored[0] + len(x)) or encode(x)  # images this process scored
rows = common.evaluate_task(run.model, run.task, run.eval_tf, torch.device("cpu"), batch_size=5)
open(f"{sys.argv[2]}.{common.dist.get_rank() if common.dist.is_initialized() else 0}", "w").write(str(scored[0]))
if common.is_main_process():
    open(sys.argv[2], "w").write(json.dumps(rows))
"""


def test_sharded_evaluation_equals_one_process(tmp_path, folder_data, tiny_model):
    """2 processes each score half of every split (17 images in one: not divisible by 2, with an
    unreadable file) and get the accuracy, ECE and NLL of 1 process."""
    from conftest import write_images

    write_images(Path(folder_data) / "sketch" / "owl", 5, seed=99)  # sketch: 4 x 4 images + 1
    (Path(folder_data) / "sketch" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    run_script([str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", folder_data, "--model",
                tiny_model, "--steps", "2", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "run")], cwd=tmp_path)
    (tmp_path / "eval.py").write_text(EVAL)
    env = {"OMP_NUM_THREADS": "1"}
    run_script([str(tmp_path / "eval.py"), str(tmp_path / "run"), str(tmp_path / "one.json")], cwd=tmp_path, env_extra=env)
    run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29542", str(tmp_path / "eval.py"),
                str(tmp_path / "run"), str(tmp_path / "two.json")], cwd=tmp_path, env_extra=env)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert [r["split"] for r in one] == [r["split"] for r in two] == ["test", "sketch"]
    sketch = one[1]
    assert sketch["n"] == 16 + 1 and sketch["skipped"] == 1  # 18 files, one unreadable
    counts = [int((tmp_path / f"two.json.{r}").read_text()) for r in (0, 1)]
    # test 16 = 8 + 8; sketch 18 files = 9 + 9, the unreadable one (sketch/cat/broken.jpg, first) in rank 0's half
    assert counts == [8 + 8, 8 + 9] and int((tmp_path / "one.json.0").read_text()) == 16 + 17
    for a, b in zip(one, two):
        assert (a["n"], a["skipped"]) == (b["n"], b["skipped"])
        for metric in ("acc", "ece", "nll"):
            assert abs(a[metric] - b[metric]) <= 1e-6, (a["split"], metric, a[metric], b[metric])


def results_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_and_merge_under_torchrun_give_the_rows_of_one_process(tmp_path, folder_data, tiny_model):
    """`torchrun --nproc_per_node 2 evaluate.py eval`, `... merge.py wise` and `... merge.py tpgm` (gloo on CPU)
    write the rows of 1 process (≤ 1e-6) once, from rank 0, and print the tables once."""
    (Path(folder_data) / "sketch" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")  # 17 files: uneven shards
    run = tmp_path / "run"
    run_script([str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", folder_data, "--model",
                tiny_model, "--steps", "2", "--batch-size", "8", "--out", str(run)], cwd=tmp_path)
    env, torchrun = {"OMP_NUM_THREADS": "1"}, ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544"]
    jobs = {"eval": [str(REPO / "evaluate.py"), "eval", "--ckpt", str(run)],
            "wise": [str(REPO / "merge.py"), "wise", "--ckpt", str(run), "--alphas", "0,0.5,1", "--plot", "curve.png"],
            "tpgm": [str(REPO / "merge.py"), "tpgm", "--ckpt", str(run), "--steps", "3", "--batch-size", "4", "--out", "tp"]}
    for name, argv in jobs.items():
        before = len(results_rows(run / "results.jsonl"))
        one = run_script(argv, cwd=tmp_path, env_extra=env).stdout
        middle = len(results_rows(run / "results.jsonl"))
        two = run_script([*torchrun, *argv], cwd=tmp_path, env_extra=env).stdout
        rows = results_rows(run / "results.jsonl")
        assert len(rows) == 2 * (middle - before) + before, name  # rank 0 alone appended its rows
        for a, b in zip(rows[before:middle], rows[middle:]):
            assert (a["tag"], a["split"], a["n"], a["skipped"]) == (b["tag"], b["split"], b["n"], b["skipped"])
            assert all(abs(a[m] - b[m]) <= 1e-6 for m in ("acc", "ece", "nll")), (name, a["tag"], a["split"])
        assert two.count("  sketch ") == one.count("  sketch ") == (3 if name == "wise" else 1)
        assert {r["tag"] for r in rows[middle:]} == ({"wise a=0", "wise a=0.5", "wise a=1"} if name == "wise" else
                                                     {"tpgm" if name == "tpgm" else ""}) and rows[-1]["skipped"] == 1


HEAD = """
import json, sys, torch, open_clip
import common
common.init_distributed(torch.device("cpu"))
common.HEAD_PROMPTS = 4  # 2 templates: 2 classes a chunk, so 7 classes are 4 chunks, 2 per process
torch.manual_seed(0)
clip, tokenizer, _ = common.load_clip(sys.argv[1], "", "cpu")
seen = [0]
def counting(texts):
    seen[0] += len(texts)
    return tokenizer(texts)
classes, templates = ["cat", "dog", "red fox", "owl", "a very long name of a bird", "cow", "ant"], ["a photo of a {}.", "{}"]
head = common.zeroshot_head(clip, counting, classes, templates)
rank = common.dist.get_rank() if common.dist.is_initialized() else 0
torch.save({"head": head, "prompts": seen[0]}, f"{sys.argv[2]}.{rank}")
if rank == 0:  # open_clip's builder: float32 on the full context, what the head was before
    ref = open_clip.build_zero_shot_classifier(clip, tokenizer, classes, [t.format for t in templates], device="cpu")
    torch.save(ref.t(), sys.argv[2] + ".ref")
"""


def test_zeroshot_head_equals_open_clips_builder_and_is_shared_out_over_processes(tmp_path, tiny_model):
    """The head through encode_text's early stop (autocast is off on CPU) is open_clip's full-context float32
    head to 1e-6, and under torchrun ×2 every process builds half the class chunks and gets all the rows."""
    (tmp_path / "head.py").write_text(HEAD)
    env = {"OMP_NUM_THREADS": "1"}
    run_script([str(tmp_path / "head.py"), tiny_model, str(tmp_path / "one")], cwd=tmp_path, env_extra=env)
    run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29545", str(tmp_path / "head.py"),
                tiny_model, str(tmp_path / "two")], cwd=tmp_path, env_extra=env)
    one, ref = torch.load(tmp_path / "one.0"), torch.load(tmp_path / "one.ref")
    two = [torch.load(tmp_path / f"two.{r}") for r in (0, 1)]
    assert one["head"].shape == ref.shape == (7, 32) and one["prompts"] == 14
    assert (one["head"] - ref).abs().max() <= 1e-6
    assert [t["prompts"] for t in two] == [8, 6]  # chunks 0, 2 (4 + 4 prompts) and 1, 3 (4 + 2)
    for t in two:
        assert torch.equal(t["head"], one["head"])  # a chunk is the same forward in either world


def test_a_broken_training_image_is_replaced_alike_under_every_configuration(tmp_path, folder_data, tiny_model):
    """A .jpg that is not a JPEG among the training images: FLYP and ARF (all_gather of equal micro-batches)
    finish under torchrun and --grad-accum 2 with the weights of 1 process, since the broken image is
    replaced by the same readable one whatever the partitioning, and each run names it once."""
    root = Path(folder_data)
    broken = root / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")  # 49 training images: 7 steps of 8 draw every one
    (tmp_path / "caps.tsv").write_text("".join(f"{p}\ta {p.parent.name} number {p.stem}\n" for p in sorted((root / "train").glob("*/*.jpg"))))
    pool = make_pool(tmp_path / "pool", sorted((root / "train" / "owl").iterdir())[:3])
    micro = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "7", "--batch-size", "8",
             "--lr", "1e-3", "--eval-every", "0", "--ckpt-every", "0", "--workers", "0", "--crop-scale", "0.5"]
    arf = ["--captioner", "dataset", "--captions", str(tmp_path / "caps.tsv"), "--pool", str(pool), "--retrieve-k", "2",
           "--ret-batch-size", "4", "--cache", str(tmp_path / "cache")]
    (tmp_path / "driver.py").write_text(DRIVER)
    finals = {}
    for config, flags in CONFIGS.items():
        jobs = [(str(REPO / "baselines.py"), ["--method", "flyp", *micro, *(flags or []), "--out", str(tmp_path / config / "flyp")]),
                (str(REPO / "arf.py"), [*micro, *(flags or []), *arf, "--out", str(tmp_path / config / "arf")])]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if flags is None else []
        proc = run_script([*launcher, str(tmp_path / "driver.py"), json.dumps(jobs)], cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
        warnings = [x for x in (proc.stdout + proc.stderr).splitlines() if "unreadable training image" in x]
        assert len(warnings) == 2 and all(x.count(str(broken)) == 1 for x in warnings), (config, warnings)  # one per run
        finals[config] = {m: torch.load(tmp_path / config / m / "final.pt", weights_only=False)["model"] for m in ("flyp", "arf")}
    for config in ("accum2", "torchrun2"):
        for m in ("flyp", "arf"):
            assert not close(finals["one"][m], finals[config][m]), (m, config, close(finals["one"][m], finals[config][m])[:4])
