"""merge.py: exact endpoints of WiSE-FT / TPGM, soups and ensembles of one model, greedy selection,
effective robustness, and the CLI on tiny fine-tuned runs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baselines
import common
import merge
from common import evaluate_split, load_task
from conftest import COLOURS, stable_seed, write_images

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: torch on one thread for the module


def random_state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(5, 3, generator=g), "b": scale * torch.randn(3, generator=g),
            "counter": torch.tensor(seed)}  # a non-float buffer (BatchNorm's num_batches_tracked)


# ---------------------------------------------------------------- pure functions
def test_wise_endpoints_are_bit_exact_and_midpoint_is_the_average():
    s0, s1 = random_state(0, scale=1e3), random_state(1)  # θ0 + 1·(θ1 − θ0) != θ1 in floats at these magnitudes
    for k in s0:
        assert torch.equal(merge.wise(s0, s1, 0.0)[k], s0[k])
        assert torch.equal(merge.wise(s0, s1, 1.0)[k], s1[k])
    mid = merge.wise(s0, s1, 0.5)
    torch.testing.assert_close(mid["w"], (s0["w"] + s1["w"]) / 2, rtol=1e-6, atol=1e-6)
    assert mid["counter"] == s1["counter"] and merge.wise(s0, s1, 0.3)["counter"] == s0["counter"]
    assert merge.wise(s0, s1, 0.25)["b"][0].item() == pytest.approx(0.75 * s0["b"][0].item() + 0.25 * s1["b"][0].item(), rel=1e-5)


def test_wise_refuses_mismatched_architectures():
    s0, s1 = random_state(0), random_state(1)
    s1["w"] = torch.zeros(4, 3)
    with pytest.raises(SystemExit, match="different architectures"):
        merge.wise(s0, s1, 0.5)


def test_tpgm_projection_closed_form():
    s0, s1 = random_state(0), random_state(1)
    dist = merge.tpgm_distances(s0, s1)
    assert set(dist) == {"w", "b"}  # only moved float tensors get a radius
    big = merge.tpgm_project(s0, s1, {k: 1e9 for k in dist})
    zero = merge.tpgm_project(s0, s1, {k: 0.0 for k in dist})
    for k in s0:
        assert torch.equal(big[k], s1[k])
        assert torch.equal(zero[k], s0[k] if k in dist else s1[k])
    half = merge.tpgm_project(s0, s1, {"w": dist["w"] / 4, "b": 1e9})
    assert (half["w"] - s0["w"]).norm().item() == pytest.approx(dist["w"] / 4, rel=1e-5)  # on the sphere of radius γ
    torch.testing.assert_close(half["w"], s0["w"] + 0.25 * (s1["w"] - s0["w"]))  # along θ_ft − θ0
    assert torch.equal(half["b"], s1["b"])


def test_uniform_soup_of_copies_is_the_model_and_of_two_is_the_midpoint():
    s = random_state(3)
    soup = merge.uniform_soup([s, s, s, s, s])
    assert all(torch.equal(soup[k], s[k]) for k in s)
    s0, s1, s2 = random_state(0), random_state(1), random_state(2)
    torch.testing.assert_close(merge.uniform_soup([s0, s1])["w"], (s0["w"] + s1["w"]) / 2)
    torch.testing.assert_close(merge.uniform_soup([s0, s1, s2])["w"], (s0["w"] + s1["w"] + s2["w"]) / 3)


def test_model_stock_closed_forms():
    s0 = random_state(0)
    moved = lambda dw, db: {"w": s0["w"] + dw, "b": s0["b"] + db, "counter": s0["counter"] + 1}  # noqa: E731
    d = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    # identical deltas: cos θ = 1, t = 1, the merge is the average = each run
    same, ratios = merge.model_stock(s0, [moved(d, d[0]), moved(d, d[0])])
    assert ratios == pytest.approx({"w": 1.0, "b": 1.0})
    torch.testing.assert_close(same["w"], s0["w"] + d)
    assert same["counter"] == s0["counter"] + 1  # non-float tensors: the soup's (run 0's)
    # orthogonal deltas (disjoint entries) and opposite ones: t = 0, θ0 exactly
    top, bottom = d * (torch.arange(5) < 2).view(5, 1), d * (torch.arange(5) >= 2).view(5, 1)
    ortho, ratios = merge.model_stock(s0, [moved(top, d[0]), moved(bottom, -d[0])])
    assert ratios == {"w": 0.0, "b": 0.0} and all(torch.equal(ortho[k], s0[k]) for k in ("w", "b"))
    # N = 2 at a known angle per tensor: t = 2 cos θ / (1 + cos θ), w_H = w_0 + t · mean delta
    u = torch.zeros(5, 3)
    u[0, 0] = 2.0
    v = torch.zeros(5, 3)
    v[0, 0], v[0, 1] = 0.5, 3 ** 0.5 / 2  # 60° from u: cos θ = 1/2, t = 2/3
    p, q = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.8, 0.6, 0.0])  # cos θ = 0.8, t = 1.6/1.8
    two, ratios = merge.model_stock(s0, [moved(u, p), moved(v, q)])
    assert ratios["w"] == pytest.approx(2 / 3, rel=1e-6) and ratios["b"] == pytest.approx(1.6 / 1.8, rel=1e-6)
    torch.testing.assert_close(two["w"], s0["w"] + 2 / 3 * (u + v) / 2)
    torch.testing.assert_close(two["b"], s0["b"] + 1.6 / 1.8 * (p + q) / 2)
    # N = 3: cos θ is the mean over the pairs; deltas e1, e2, e1: (0 + 1 + 0) / 3, t = 3·(1/3) / (1 + 2·(1/3)) = 0.6
    e1, e2 = torch.zeros(5, 3), torch.zeros(5, 3)
    e1[1, 1], e2[2, 2] = 1.0, 1.0
    three, ratios = merge.model_stock(s0, [moved(e1, p), moved(e2, p), moved(e1, p)])
    assert ratios["w"] == pytest.approx(0.6) and ratios["b"] == pytest.approx(1.0)
    torch.testing.assert_close(three["w"], s0["w"] + 0.6 * (2 * e1 + e2) / 3)
    # a tensor no run moved stays θ0 (and has no t); a run that did not move it makes it orthogonal
    still, ratios = merge.model_stock(s0, [moved(u, 0 * p), moved(v, 0 * p)])
    assert "b" not in ratios and torch.equal(still["b"], s0["b"])
    half, ratios = merge.model_stock(s0, [moved(u, p), moved(v, 0 * p)])
    assert ratios["b"] == 0.0 and torch.equal(half["b"], s0["b"])
    with pytest.raises(SystemExit, match="at least two"):
        merge.model_stock(s0, [moved(u, p)])
    with pytest.raises(SystemExit, match="different architectures"):
        merge.model_stock(s0, [moved(u, p), {**moved(v, q), "w": torch.zeros(4, 3)}])


def test_ensemble_of_one_is_the_model():
    logits = torch.randn(7, 4)
    assert torch.equal(merge.ensemble_logits([logits]), logits)
    torch.testing.assert_close(merge.ensemble_logits([logits, 3 * logits]), 2 * logits)


def test_greedy_select_strict_and_never_worse_than_best_member():
    scores = [0.5, 0.7, 0.6]
    # hand loop: start from member 1 (0.7); {1,2} ties 0.7 -> not added (strict); {1,0} improves -> added
    table = {(1, 2): 0.7, (1, 0): 0.75}
    chosen, best, trace = merge.greedy_select(scores, lambda idx: table[tuple(idx)])
    assert chosen == [1, 0] and best == 0.75
    assert trace == [(2, 0.7, False), (0, 0.75, True)]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # any scoring: the result is at least the best single member
        n = int(torch.randint(1, 6, (1,), generator=g))
        member = torch.rand(n, generator=g).tolist()
        chosen, best, _ = merge.greedy_select(member, lambda idx: torch.rand(1, generator=g).item())
        assert best >= max(member) and chosen[0] == max(range(n), key=lambda i: member[i])


# ---------------------------------------------------------------- on tiny fine-tuned runs
@pytest.fixture(scope="module")
def module_runs(tmp_path_factory, tiny_model):
    """Two FT runs from one initialisation (seed 0, different lr) and the zero-shot run, made once;
    each test writes its own tags and output folders."""
    base = tmp_path_factory.mktemp("merge")
    data = base / "folder"
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(data / split / name, n, seed=stable_seed(split, k), colour=COLOURS[k])
    runs = base / "runs"
    micro = ["--data", "folder", "--data-root", str(data), "--model", tiny_model, "--batch-size", "8", "--workers", "0"]
    baselines.main(["--method", "zeroshot", *micro, "--out", str(runs / "zs-s0")])
    baselines.main(["--method", "ft", *micro, "--steps", "4", "--lr", "1e-3", "--out", str(runs / "ft-a-s0")])
    baselines.main(["--method", "ft", *micro, "--steps", "3", "--lr", "3e-4", "--out", str(runs / "ft-b-s0")])
    baselines.main(["--method", "flyp", *micro, "--steps", "3", "--lr", "1e-3", "--out", str(runs / "flyp-s0")])
    return {"zs": str(runs / "zs-s0"), "a": str(runs / "ft-a-s0"), "b": str(runs / "ft-b-s0"), "flyp": str(runs / "flyp-s0"),
            "common": micro}


@pytest.fixture
def runs(module_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (runs/..., curve.png) land in the test's own folder
    return module_runs


def results(run, tag):
    rows = [json.loads(line) for line in (Path(run) / "results.jsonl").read_text().splitlines()]
    return {r["split"]: r for r in rows if r["tag"] == tag}


def test_wise_cli_endpoints_reproduce_zeroshot_and_ft_runs(runs):
    merge.main(["wise", "--ckpt", runs["a"], "--alphas", "0,0.5,1"])
    zs, ft = results(runs["zs"], ""), results(runs["a"], "")
    for tag, ref in (("wise a=0", zs), ("wise a=1", ft)):
        got = results(runs["a"], tag)
        assert set(got) == set(ref)
        for split in ref:
            assert (got[split]["acc"], got[split]["nll"], got[split]["ece"]) == (ref[split]["acc"], ref[split]["nll"], ref[split]["ece"])
    assert "wise a=0.5" in {json.loads(x)["tag"] for x in (Path(runs["a"]).parent / "results.jsonl").read_text().splitlines()}
    assert Path(runs["a"], "wise_curve.png").stat().st_size > 1000
    # θ0 rebuilt by merge.py is the zero-shot run's checkpoint, bit for bit
    run = common.load_run(runs["a"], "cpu")
    saved = torch.load(Path(runs["zs"]) / "final.pt", weights_only=False)["model"]
    built = common.run_theta0(run, "cpu").state_dict()
    assert all(torch.equal(built[k], saved[k]) for k in saved)


def test_wise_refuses_runs_that_do_not_belong_together_and_a_zero_shot_run(runs, tmp_path):
    """One curve through runs of two datasets, or "WiSE-FT" of θ0 with itself, would exit 0 with numbers
    that mean nothing: each stops with one message."""
    import shutil

    other = tmp_path / "other-data"
    shutil.copytree(runs["common"][3], other)
    micro = [*runs["common"][:3], str(other), *runs["common"][4:]]
    baselines.main(["--method", "ft", *micro, "--steps", "1", "--out", str(tmp_path / "ft-other")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for ckpts, message in (([runs["a"], str(tmp_path / "ft-other")], "differ in data_root"), ([runs["zs"]], "holds θ0 itself")):
        proc = subprocess.run([sys.executable, str(REPO / "merge.py"), "wise", "--ckpt", *ckpts, "--alphas", "0,1"],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


def test_learn_radii_penalty_and_descent(runs):
    run = common.load_run(runs["a"], "cpu")
    state1 = {k: v.clone() for k, v in run.model.state_dict().items()}
    state0 = common.run_theta0(run, "cpu").state_dict()
    images = torch.stack([run.eval_tf(run.task.train.images.load(i)) for i in range(16)])
    batch = {"image": images, "label": torch.as_tensor(run.task.train.images.labels[:16])}
    dist = merge.tpgm_distances(state0, state1)
    radii = merge.learn_radii(run.model, state0, state1, iter([batch] * 20), 20, 1e-2, 1e4, "cpu")
    assert all(radii[k] == 0 for k in dist)  # a huge TPGM-C penalty pulls every radius to 0 -> θ0
    assert all(torch.equal(v, state0[k]) for k, v in merge.tpgm_project(state0, state1, radii).items() if k in dist)

    def ce(state):
        run.model.load_state_dict(state)
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(run.model(batch["image"]), batch["label"]).item()

    init = ce(merge.tpgm_project(state0, state1, {k: merge.TPGM_INIT * d for k, d in dist.items()}))
    radii = merge.learn_radii(run.model, state0, state1, iter([batch] * 20), 20, 1e-2, 0.0, "cpu")
    assert all(0 <= radii[k] <= dist[k] + 1e-6 for k in dist)
    assert ce(merge.tpgm_project(state0, state1, radii)) < init  # Adam on the radii lowers the fitted CE


def test_tpgm_cli_uses_heldout_and_writes_radii(runs, monkeypatch):
    seen = []
    real = merge.shuffled_batches
    monkeypatch.setattr(merge, "shuffled_batches", lambda images, *a: seen.append(images) or real(images, *a))
    merge.main(["tpgm-c", "--ckpt", runs["a"], "--steps", "3", "--batch-size", "4", "--reg", "0.5"])
    run = common.load_run(runs["a"], "cpu")
    assert [len(s) for s in seen] == [len(run.task.heldout.images)] and seen[0].paths == run.task.heldout.images.paths
    radii = json.loads(Path(runs["a"], "tpgm-c-reg0.5", "radii.json").read_text())
    assert radii and all(0 <= r["ratio"] <= 1 for r in radii.values())
    assert set(results(runs["a"], "tpgm-c reg=0.5")) == {"test", "sketch"}
    common.load_run(Path(runs["a"], "tpgm-c-reg0.5"), "cpu")  # the projected model is itself a loadable run


def test_tpgm_on_flyp_fits_the_text_tower_through_the_head_it_evaluates(runs):
    """A FLYP run classifies with the head of its text tower: TPGM must fit the text tower's radii through
    that head (they used to keep their start value, 0.5, while the head was rebuilt from them at the end),
    and the model whose held-out CE is minimised is the model evaluated."""
    proc = subprocess.run([sys.executable, str(REPO / "merge.py"), "tpgm", "--ckpt", runs["flyp"], "--steps", "30", "--lr",
                           "0.05", "--batch-size", "8"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    radii = json.loads(Path(runs["flyp"], "tpgm", "radii.json").read_text())
    text = {k: r["ratio"] for k, r in radii.items() if k.startswith(("clip.transformer", "clip.token_embedding",
                                                                           "clip.ln_final", "clip.text_projection"))}
    assert text and "head" not in radii
    assert sum(abs(r - merge.TPGM_INIT) > 1e-3 for r in text.values()) >= len(text) // 2, text  # they moved
    run = common.load_run(runs["flyp"], "cpu")
    state0, state1 = merge.run_endpoints(run, "cpu")
    gamma = {k: r["radius"] for k, r in radii.items()}
    params = {k: state0[k] + min(1.0, gamma[k] / r["dist"]) * (state1[k] - state0[k]) for k, r in radii.items()}
    head = merge.differentiable_text_head(run.model, run.task, run.seed)
    images = torch.stack([run.eval_tf(run.task.heldout.images.load(i)) for i in range(len(run.task.heldout.images))])
    with torch.no_grad():
        fitted = torch.func.functional_call(run.model, {**params, "head": head(params, 0)}, (images,))  # [N, K]
        merge.load_run_weights(run, merge.tpgm_project(state0, state1, gamma))  # what `tpgm` evaluates and saves
        evaluated = run.model(images)
    assert torch.allclose(fitted, evaluated, atol=1e-4)


def test_soups_and_ensembles_on_runs(runs):
    # a soup of N copies of one run is that run; an ensemble of one run is that run
    rows, _ = merge.main(["soup", "--kind", "uniform", "--ckpt", runs["a"], runs["a"], runs["a"], "--out", "runs/soup-copies"])
    soup = torch.load("runs/soup-copies/final.pt", weights_only=False)["model"]
    ft = torch.load(Path(runs["a"]) / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(soup[k], ft[k]) for k in ft)
    rows, _ = merge.main(["ensemble", "--kind", "output", "--ckpt", runs["a"], "--out", "runs/ens-one"])
    ref = results(runs["a"], "")
    for r in rows:
        assert (r["acc"], r["nll"], r["ece"]) == (ref[r["split"]]["acc"], ref[r["split"]]["nll"], ref[r["split"]]["ece"])
    # greedy soup: never worse on held-out than its best member
    merge.main(["soup", "--kind", "greedy", "--ckpt", runs["b"], runs["a"], runs["zs"], "--out", "runs/soup-greedy"])
    task = load_task("folder", runs["common"][3], 0)
    accs = []
    for path in (runs["a"], runs["b"], runs["zs"], "runs/soup-greedy"):
        r = common.load_run(path, "cpu")
        accs.append(evaluate_split(r.model, task.heldout, task, r.eval_tf, torch.device("cpu"))["acc"])
    assert accs[-1] >= max(accs[:-1])
    rows, members = merge.main(["ensemble", "--kind", "greedy", "--ckpt", runs["a"], runs["b"], "--out", "runs/ens-g"])
    assert 1 <= len(members) <= 2 and results("runs/ens-g", "ensemble greedy").keys() == {"test", "sketch"}


def test_soup_refuses_other_architectures_and_initialisations(runs, tmp_path):
    other = tmp_path / "wider.json"
    cfg = json.loads(Path(runs["common"][5]).read_text())
    cfg["vision_cfg"]["width"] = 48
    other.write_text(json.dumps(cfg))
    common = runs["common"][:4] + ["--batch-size", "8"]
    baselines.main(["--method", "ft", *common, "--model", str(other), "--steps", "1", "--out", "runs/ft-wide-s0"])
    baselines.main(["--method", "ft", *common, "--model", runs["common"][5], "--steps", "1", "--seed", "1", "--out", "runs/ft-s1"])
    with pytest.raises(SystemExit, match="different architectures"):
        merge.main(["soup", "--ckpt", runs["a"], "runs/ft-wide-s0"])
    with pytest.raises(SystemExit, match="shared initialisation"):  # a random-init model differs per seed
        merge.main(["soup", "--ckpt", runs["a"], "runs/ft-s1"])


def test_stock_cli_on_two_seeds_from_one_init_and_refusal_of_another_init(runs, tmp_path):
    """Two FT runs of seeds 0 and 1 from one weights file: `merge.py stock` writes a run whose weights are
    model_stock(θ0, runs), its t per tensor and rows tagged "stock"; runs from two random inits are refused."""
    weights = tmp_path / "tiny-init.pt"
    common.seed_everything(0)
    torch.save(common.load_clip(runs["common"][5])[0].state_dict(), weights)
    micro = [*runs["common"], "--pretrained", str(weights), "--steps", "3", "--lr", "1e-3"]
    for seed in (0, 1):
        baselines.main(["--method", "ft", *micro, "--seed", str(seed), "--out", f"runs/ft-s{seed}"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "merge.py"), "stock", "--ckpt", "runs/ft-s0", "runs/ft-s1", "--workers",
                           "0", "--out", "runs/stock"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(results("runs/stock", "stock")) == {"test", "sketch"}
    assert all(r["members"] == ["runs/ft-s0", "runs/ft-s1"] for r in results("runs/stock", "stock").values())
    ratios = json.loads(Path("runs/stock/ratios.json").read_text())
    assert ratios and all(0 <= t <= 1 for t in ratios.values()) and "head" in ratios
    assert not any(k.startswith("clip.transformer") for k in ratios)  # FT froze the text tower: no run moved it
    members = [common.load_run(f"runs/ft-s{s}", "cpu") for s in (0, 1)]
    state0 = common.run_theta0(members[0], "cpu").state_dict()
    want, want_ratios = merge.model_stock(state0, [r.model.state_dict() for r in members])
    got = common.load_run("runs/stock", "cpu")
    assert got.method == "ft+stock" and want_ratios == pytest.approx(ratios)
    assert all(torch.allclose(got.model.state_dict()[k], v) for k, v in want.items())
    baselines.main(["--method", "ft", *runs["common"], "--steps", "1", "--seed", "1", "--out", "runs/ft-random-s1"])
    proc = subprocess.run([sys.executable, str(REPO / "merge.py"), "stock", "--ckpt", runs["a"], "runs/ft-random-s1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "shared initialisation" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


def test_cli_smoke(runs):
    out = subprocess.run([sys.executable, str(REPO / "merge.py"), "wise", "--ckpt", runs["a"], "--alphas", "0:1:1",
                          "--plot", "curve.png"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "| ft | 1 | 1 |" in out.stdout and Path("curve.png").is_file()


def test_wise_on_flyp_rebuilds_the_head_from_the_interpolated_text_tower(runs):
    merge.main(["wise", "--ckpt", runs["flyp"], "--alphas", "0,0.5,1", "--plot", "curve.png"])
    run = common.load_run(runs["flyp"], "cpu")
    assert run.meta["head_from_text"]
    state0, state1 = merge.run_endpoints(run, "cpu")
    run.model.load_state_dict(merge.wise(state0, state1, 0.5))
    merged_head = run.model.head.detach().clone()
    run.model.head.data = common.zeroshot_head(run.model.clip, run.model.tokenizer, run.task.classnames, run.task.templates)
    direct = {r["split"]: r for r in common.evaluate_task(run.model, run.task, run.eval_tf, torch.device("cpu"))}
    got = results(runs["flyp"], "wise a=0.5")
    for split, row in direct.items():  # every split, ID and OOD too: the rebuilt head, to round-off
        assert all(abs(got[split][m] - row[m]) <= 1e-6 for m in ("acc", "ece", "nll")), split
    rows_cos = torch.nn.functional.cosine_similarity(merged_head, run.model.head.detach(), dim=-1)
    assert rows_cos.min() < 1 - 1e-6  # the linearly merged head is not what the merged text tower builds
    zs, flyp = (results(runs[k], "") for k in ("zs", "flyp"))
    a0, a1 = results(runs["flyp"], "wise a=0"), results(runs["flyp"], "wise a=1")
    for split in zs:  # the endpoints are still exact: α = 0 is the zero-shot run, α = 1 the FLYP run
        assert all(a0[split][m] == zs[split][m] and a1[split][m] == flyp[split][m] for m in ("acc", "ece", "nll")), split



def test_wise_sweep_loads_each_image_once_and_its_rows_are_those_of_one_pass_per_alpha(runs, monkeypatch):
    """Every test image is loaded (and transformed) once for the whole sweep, not once per α; each α's rows
    are those of evaluating θ_α alone."""
    from tasks.base import FileImages

    loads, load = [], FileImages.load
    monkeypatch.setattr(FileImages, "load", lambda self, i: loads.append(self.paths[i]) or load(self, i))  # counts, then loads
    alphas = [0, 0.25, 0.5, 0.75, 1]
    merge.main(["wise", "--ckpt", runs["a"], "--alphas", ",".join(map(str, alphas)), "--plot", "curve.png"])
    run = common.load_run(runs["a"], "cpu")
    images = [p for s in run.task.tests for p in s.images.paths]
    assert sorted(loads) == sorted(images) and len(images) == 32
    state0, state1 = merge.run_endpoints(run, "cpu")
    for alpha in alphas:
        run.model.load_state_dict(merge.wise(state0, state1, alpha))
        alone = common.evaluate_task(run.model, run.task, run.eval_tf, torch.device("cpu"))
        got = results(runs["a"], f"wise a={alpha:g}")
        for row in alone:
            assert all(got[row["split"]][m] == row[m] for m in ("acc", "ece", "nll", "n", "skipped")), (alpha, row["split"])


# ------------------------------------------------------------------------ runs and their θ0, curves
def test_run_endpoints_warn_when_the_rebuilt_init_shares_no_tensor(capsys, monkeypatch):
    g = torch.Generator().manual_seed(0)
    s0 = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    s1 = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    as_module = lambda state: type("M", (), {"state_dict": lambda self: state})()  # noqa: E731
    run = type("Run", (), {"dir": "r", "method": "ft", "meta": {"model": "m", "pretrained": ""}, "model": as_module(s1)})
    monkeypatch.setattr(merge, "run_theta0", lambda run, device: as_module(s0))
    got0, got1 = merge.run_endpoints(run, "cpu")
    assert "differs from the rebuilt θ0" in capsys.readouterr().out
    assert all(torch.equal(got0[k], s0[k]) and torch.equal(got1[k], s1[k]) for k in s0)
    run.model = as_module({**s1, "b": s0["b"]})  # a frozen tensor equal to θ0's: the init is the run's own
    merge.run_endpoints(run, "cpu")
    assert capsys.readouterr().out == ""


def test_effective_robustness_margin():
    curve = [(60.0, 50.0), (70.0, 52.0), (80.0, 48.0)]  # zero-shot -> FT
    assert merge.effective_robustness_margin(curve, (65.0, 55.0)) == pytest.approx(55.0 - 51.0)
    assert merge.effective_robustness_margin(curve, (75.0, 47.0)) == pytest.approx(47.0 - 50.0)
    assert merge.effective_robustness_margin(curve, (70.0, 52.0)) == pytest.approx(0.0)
    assert math.isnan(merge.effective_robustness_margin(curve, (85.0, 60.0)))  # no extrapolation
    bent = [(60.0, 50.0), (80.0, 60.0), (75.0, 40.0)]  # ID not monotone in α: the higher bar counts
    assert merge.effective_robustness_margin(bent, (77.0, 59.0)) == pytest.approx(59.0 - 58.5)  # not 59 - 48


def test_parse_alphas():
    assert merge.parse_alphas("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert merge.parse_alphas("0,0.5,1") == [0.0, 0.5, 1.0]


def test_check_together_names_every_task_field_that_differs():
    """WiSE-FT curves, soups, Model Stock and ensembles refuse runs scored on different tasks, whatever the
    field (a DomainBed test domain, GZSL's unseen classes, the zero-shot folders), naming it; seed, shots and
    recipe may differ. Ensembles may mix models."""
    from argparse import Namespace

    meta = {"classnames": ["a", "b"], "model": "m", "pretrained": "p"}
    base = Namespace(dir="runs/x", args={"data": "domainbed", "test_domain": "sketch", "seed": 0, "lr": 1e-5}, meta=meta)
    merge.check_together([base, Namespace(dir="runs/y", args={**base.args, "seed": 1, "shots": 4, "lr": 3e-5}, meta=meta)], "x")
    for field, value in (("test_domain", "photo"), ("unseen_classes", "b"), ("zeroshot_data", "zs"), ("data_root", "/d")):
        other = Namespace(dir="runs/y", args={**base.args, field: value}, meta=meta)
        with pytest.raises(SystemExit, match=f"differ in {field}: why"):
            merge.check_together([base, other], "why")
    other = Namespace(dir="runs/y", args=base.args, meta={**meta, "model": "m2"})
    merge.check_together([base, other], "x", same_model=False)
    with pytest.raises(SystemExit, match="differ in model"):
        merge.check_together([base, other], "x")
