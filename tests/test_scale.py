"""Scale: every method ends with the same weights from 1 process at global batch B, from `--grad-accum 2`
at B, and from `torchrun --nproc_per_node 2` at B (gloo on CPU). For the CE-based methods that is the
mean over the batch split differently; for FLYP and ARF it needs the global-batch InfoNCE
(common.ContrastiveLoss: rows gathered across processes with gradient, open_clip's feature cache under
accumulation)."""
import json

import pytest
import torch

from conftest import REPO, make_pool, run_script

DRIVER = """
import json, runpy, sys
for script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
"""
METHODS = ["lp", "ft", "lpft", "scratch", "ema", "l2sp", "kd", "featkd", "flyp", "lipsum_ft", "car_ft", "arf"]
CONFIGS = {"one": [], "accum2": ["--grad-accum", "2"], "torchrun2": None}


def close(a: dict, b: dict, atol=1e-5) -> list:
    """Names of the tensors that differ by more than atol. The attention key bias has an exactly-zero
    gradient (softmax is shift-invariant), so Adam divides float round-off by its own magnitude there:
    its key third is left out, every parameter that learns must match."""
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            w = x.shape[0] // 3
            x, y = torch.cat([x[:w], x[2 * w:]]), torch.cat([y[:w], y[2 * w:]])
        if not torch.allclose(x, y, atol=atol, rtol=0):
            bad.append(f"{k} ({(x - y).abs().max().item():.2e})")
    return bad


@pytest.fixture(scope="module")
def finals(tmp_path_factory, tiny_model):
    """final.pt of every method under every configuration, trained once for the module."""
    from conftest import COLOURS, write_images

    base = tmp_path_factory.mktemp("scale")
    data = base / "folder"
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(data / split / name, n, seed=hash((split, k)) % 2**32, colour=COLOURS[k])
    (base / "caps.tsv").write_text("".join(f"{p}\ta {p.parent.name} number {p.stem}\n"
                                           for p in sorted((data / "train").glob("*/*.jpg"))))
    pool = make_pool(base / "pool", sorted((data / "train" / "owl").iterdir())[:3])
    micro = ["--data", "folder", "--data-root", str(data), "--model", tiny_model, "--steps", "3", "--batch-size", "8",
             "--lr", "1e-3", "--eval-every", "0", "--ckpt-every", "0", "--workers", "0", "--crop-scale", "0.5"]
    extra = {"ema": ["--ema-decay", "0.5"], "lipsum_ft": ["--lam", "10"], "car_ft": ["--beta", "10"],
             "arf": ["--captioner", "dataset", "--captions", str(base / "caps.tsv"), "--pool", str(pool), "--retrieve-k", "2",
                     "--ret-batch-size", "4", "--cache", str(base / "cache")]}
    (base / "driver.py").write_text(DRIVER)
    out = {}
    for config, flags in CONFIGS.items():
        runs = base / config
        jobs = []
        for m in METHODS:
            script = str(REPO / (f"{m}.py" if m in ("lipsum_ft", "car_ft", "arf") else "baselines.py"))
            method = [] if m in ("lipsum_ft", "car_ft", "arf") else ["--method", m]
            lp = ["--lp-run", str(runs / "lp")] if m == "lpft" else []
            jobs.append((script, [*method, *micro, *(flags or []), *extra.get(m, []), *lp, "--out", str(runs / m)]))
        launcher = (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
                    if flags is None else [])
        run_script([*launcher, str(base / "driver.py"), json.dumps(jobs)], cwd=base, env_extra={"OMP_NUM_THREADS": "1"})
        out[config] = {m: torch.load(runs / m / "final.pt", weights_only=False)["model"] for m in METHODS}
    out["init"] = torch.load(base / "one" / "lp" / "final.pt", weights_only=False)["model"]  # LP: the image tower at θ0
    return out


@pytest.mark.parametrize("config", ["accum2", "torchrun2"])
@pytest.mark.parametrize("method", METHODS)
def test_same_weights_as_one_process(finals, method, config):
    one, other = finals["one"][method], finals[config][method]
    assert set(one) == set(other)
    assert not close(one, other), f"{method} under {config}: {close(one, other)[:4]}"
    moved = [k for k in one if k.startswith("clip.visual") and not torch.equal(one[k], finals["init"][k])]
    assert moved or method == "lp", f"{method} did not train its image tower"  # not a comparison of untouched models
