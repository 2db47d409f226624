"""baselines.py: closed-form properties of each loss (regularisers vanish at θ0, EMA's endpoints, FLYP
against a hand loop), each method's wiring on a tiny CLIP, and every method end to end in one
subprocess (the script's __main__ path, run once per method by runpy to pay the imports once)."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_script

import baselines
import common


# ------------------------------------------------------------------------------------- pure losses
def test_regularisers_are_exactly_zero_at_theta0_and_positive_away():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    params = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g)]
    feats = torch.randn(6, 8, generator=g)
    ce = F.cross_entropy(logits, labels)

    loss, t = baselines.l2sp_loss(logits, labels, params, [p.clone() for p in params], lam=3.0)
    assert t["l2sp"].item() == 0.0 and torch.equal(loss, ce)
    loss, t = baselines.kd_loss(logits, logits.clone(), labels, lam=3.0, tau=2.0)
    assert t["kd"].item() == 0.0 and torch.equal(loss, ce)
    loss, t = baselines.featkd_loss(logits, labels, feats, feats.clone(), lam=3.0)
    assert t["featkd"].item() == 0.0 and torch.equal(loss, ce)

    moved = [p + 0.1 for p in params]  # ‖θ − θ0‖² = 0.01 · 19 elements
    loss, t = baselines.l2sp_loss(logits, labels, moved, params, lam=3.0)
    assert t["l2sp"].item() == pytest.approx(0.19, rel=1e-5) and loss.item() == pytest.approx(ce.item() + 1.5 * 0.19, rel=1e-5)
    z0 = torch.randn(6, 5, generator=g)
    _, t = baselines.kd_loss(logits, z0, labels, lam=1.0, tau=2.0)
    p0, p = (z0 / 2).softmax(-1), (logits / 2).softmax(-1)
    assert t["kd"].item() == pytest.approx((p0 * (p0.log() - p.log())).sum(-1).mean().item(), rel=1e-5)
    _, t = baselines.featkd_loss(logits, labels, feats + 0.5, feats, lam=1.0)
    assert t["featkd"].item() == pytest.approx(8 * 0.25, rel=1e-5)


def test_ema_decay_zero_is_live_weights_and_one_is_initial():
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    live = [torch.randn(4, 3, generator=g) * 1e3, torch.randn(5, generator=g) * 1e-3]
    for decay, expect in ((0.0, live), (1.0, init)):
        ema = [t.clone() for t in init]
        common.ema_update(ema, live, decay)
        assert all(torch.equal(e, x) for e, x in zip(ema, expect)), decay
    ema = [t.clone() for t in init]
    common.ema_update(ema, live, 0.75)
    assert all(torch.allclose(e, 0.75 * a + 0.25 * b) for e, a, b in zip(ema, init, live))


@pytest.mark.parametrize("mask", [True, False])
def test_flyp_loss_equals_hand_loop(mask):
    duplicates = "masked" if mask else "negative"
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 2, 0, 1, 2])  # duplicates: images 0/2 and 1/4 share a prompt
    img = F.normalize(torch.randn(5, 3, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 3, generator=g), dim=-1)[labels]  # one prompt embedding per class
    scale = torch.tensor(7.0)
    loss, terms = baselines.flyp_loss(img, txt, labels, scale, duplicates)

    def direction(a, b):  # mean over i of −log softmax_j(s·a_i·b_j)[i], j over allowed pairs
        total = 0.0
        for i in range(5):
            allowed = [j for j in range(5) if j == i or not (mask and labels[i] == labels[j])]
            logits = {j: 7.0 * float(a[i] @ b[j]) for j in allowed}
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits.values()))
        return total / 5

    i2t, t2i = direction(img, txt), direction(txt, img)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5) and terms["contrastive"].item() == loss.item()
    unique = torch.tensor([0, 1, 2])  # without duplicates the mask changes nothing: CLIP's loss
    a, _ = baselines.flyp_loss(img[:3], txt[[0, 3, 1]], unique, scale, "masked")
    b, _ = baselines.flyp_loss(img[:3], txt[[0, 3, 1]], unique, scale, "negative")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------- method wiring
@pytest.fixture
def tiny(tiny_model):
    return classifier_task_batch(tiny_model)


def classifier_task_batch(model_config: str) -> tuple:
    """A fresh ClipClassifier on a tiny random CLIP, a 3-class task stub and one batch."""
    torch.manual_seed(0)
    clip, tok, _ = common.load_clip(model_config)
    task = types.SimpleNamespace(classnames=["cat", "dog", "owl"], templates=["a photo of a {}.", "art of the {}."])
    model = common.ClipClassifier(clip, common.zeroshot_head(clip, tok, task.classnames, task.templates), tok).train()
    label, index = torch.tensor([0, 1, 2, 1]), torch.arange(4)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": label, "index": index, "host": {"label": label, "index": index}}
    return model, task, batch


def wiring(method, model, task, **kw) -> baselines.Recipe:
    args = baselines.Args(method=method, steps=100, **kw)
    return baselines.METHODS[method](model, args, task)


@pytest.mark.parametrize("method, term", [("l2sp", "l2sp"), ("kd", "kd"), ("featkd", "featkd")])
def test_regulariser_zero_on_the_model_at_theta0_then_grows(tiny, method, term):
    model, task, batch = tiny
    loss_fn = wiring(method, model, task).loss_fn
    loss, terms = loss_fn(model, batch, 0)
    # L2SP compares weights: exactly 0. KD / FeatKD compare with the eval-mode teacher, whose fused
    # attention kernel rounds differently from the student's training-mode path: 0 up to round-off.
    assert terms[term].item() == 0.0 if term == "l2sp" else abs(terms[term].item()) < 1e-6
    loss.backward()
    assert model.head.grad is not None and model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.token_embedding.weight.grad is None  # the text tower is frozen
    with torch.no_grad():
        for p in model.clip.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert loss_fn(model, batch, 1)[1][term].item() > 0


def test_scratch_head_starts_at_zero_and_lp_trains_only_the_head(tiny):
    model, task, batch = tiny
    wiring("scratch", model, task)
    assert torch.equal(model.head, torch.zeros_like(model.head)) and model.head.requires_grad
    wiring("lp", model, task)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head"]


def test_ema_recipe_decay_and_tag(tiny):
    model, task, batch = tiny
    recipe = wiring("ema", model, task, ema_decay=0.0)
    assert (recipe.tag, recipe.ema_decay, recipe.head_from_text) == ("m=0", 0.0, False)
    assert wiring("ema", model, task).tag == "m=0.95"  # default: 1 − 1/(EMA_WINDOW · 100 steps)
    assert baselines.ema(model, baselines.Args(method="ema", steps=50_000), task).ema_decay == pytest.approx(0.9999)
    assert wiring("ft", model, task).ema_decay is None  # only EMA asks train() for an average


def test_flyp_trains_both_towers_and_scale_not_head(tiny):
    model, task, batch = tiny
    recipe = wiring("flyp", model, task)
    assert isinstance(recipe.loss_fn, common.ContrastiveLoss)  # over the global batch (tests/test_scale.py)
    loss, terms = recipe.loss_fn.loss(recipe.loss_fn.embed(model, batch, 0), model.scale, None)  # no logit bias: InfoNCE
    loss.backward()
    assert model.clip.token_embedding.weight.grad is not None and model.clip.visual.conv1.weight.grad is not None
    assert model.clip.logit_scale.grad is not None and model.head.grad is None
    assert recipe.head_from_text  # evaluated with the head of its fine-tuned text tower


def test_flyp_template_is_a_pure_function_of_seed_step_and_image():
    index = torch.arange(64)
    ids = common.template_ids(0, 5, index, 14)  # [64]
    assert torch.equal(ids, common.template_ids(0, 5, index, 14))  # recomputed: same (processes, resume)
    assert torch.equal(ids[10:20], common.template_ids(0, 5, index[10:20], 14))  # per image, not per batch
    assert ids.min() >= 0 and ids.max() < 14 and len(set(ids.tolist())) > 5  # images get different templates
    assert not torch.equal(ids, common.template_ids(0, 6, index, 14))  # ... that change between steps
    assert not torch.equal(ids, common.template_ids(1, 5, index, 14))  # ... and seeds


def test_flyp_pairs_each_image_with_its_template_or_the_single_prompt(tiny):
    model, task, batch = tiny
    index = torch.tensor([3, 17, 8, 40])
    batch = {**batch, "index": index, "host": {**batch["host"], "index": index}}
    encode = lambda texts: common.encode_text(model.clip, model.tokenizer(texts))  # noqa: E731
    for prompt in ("random", "single"):
        recipe = wiring("flyp", model, task, flyp_prompt=prompt, seed=2)
        rows = recipe.loss_fn.embed(model, batch, 7)
        if prompt == "random":
            chosen = common.template_ids(2, 7, batch["index"], len(task.templates))
            texts = [task.templates[t].format(task.classnames[c]) for c, t in zip(batch["label"].tolist(), chosen.tolist())]
        else:  # the one prompt of the ablation
            texts = [baselines.FLYP_TEMPLATE.format(task.classnames[c]) for c in batch["label"].tolist()]
        assert torch.allclose(rows["text"], encode(texts), atol=1e-6), prompt
        assert recipe.tag == ("" if prompt == "random" else "prompt=single")
    different = [common.template_ids(2, s, batch["index"], 2) for s in range(8)]
    assert len({tuple(d.tolist()) for d in different}) > 1  # the texts move between steps
    with pytest.raises(SystemExit, match="--flyp-prompt"):
        wiring("flyp", model, task, flyp_prompt="all")


VIT_TARGETS = ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]


def lora_update(model) -> dict:
    """{name of a targeted weight in the state dict: (α/r)·B·A} of a model with LoRA on its image tower."""
    return {f"clip.visual.{n.replace('.parametrizations', '').removesuffix('.original')}": p.scaling * (p.B @ p.A)
            for n, p in ((n.rsplit(".", 1)[0], m) for n, m in model.clip.visual.named_modules()
                         if isinstance(m, baselines.LowRank))}


def test_lora_starts_at_theta0_trains_only_a_b_and_head_and_its_update_is_low_rank(tiny):
    model, task, batch = tiny
    keys0 = list(model.state_dict())
    before = model(batch["image"])
    recipe = wiring("lora", model, task, lora_rank=2, lora_alpha=3.0)
    assert torch.equal(model(batch["image"]), before)  # B = 0: step 0 is FT's θ0, bit for bit
    assert {f"clip.visual.transformer.resblocks.0.{t}" for t in VIT_TARGETS} == set(lora_update(model))  # the tiny ViT's 1 block
    lowrank = [m for m in model.modules() if isinstance(m, baselines.LowRank)]
    assert all(m.A.shape[0] == 2 and m.B.shape[1] == 2 and m.scaling == 1.5 for m in lowrank)
    assert all(not torch.equal(m.A, torch.zeros_like(m.A)) and torch.equal(m.B, torch.zeros_like(m.B)) for m in lowrank)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head", *[n for n, _ in model.named_parameters() if n.endswith((".A", ".B"))]]
    assert len(trainable) == 1 + 2 * 4
    recipe.loss_fn(model, batch, 0)[0].backward()  # at B = 0 only B (and the head) get a non-zero gradient
    assert model.head.grad.abs().sum() > 0 and all(m.B.grad.abs().sum() > 0 and m.A.grad.abs().sum() == 0 for m in lowrank)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        for m in lowrank:
            m.B.normal_()
    for m in lowrank:
        m.A.grad = m.B.grad = None
    recipe.loss_fn(model, batch, 0)[0].backward()  # once B moved, A learns too
    assert all(m.A.grad.abs().sum() > 0 for m in lowrank)
    theta0 = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".original")}
    update = {k: v.detach().clone() for k, v in lora_update(model).items()}
    assert all(torch.linalg.matrix_rank(u).item() == 2 for u in update.values())  # rank r, not full
    recipe.merge()  # final.pt: merged weights under FT's keys
    state = model.state_dict()
    assert set(state) == set(keys0) and not [m for m in model.modules() if isinstance(m, baselines.LowRank)]
    for k, u in update.items():
        w0 = theta0[k.replace(k.rsplit(".", 1)[1], "parametrizations." + k.rsplit(".", 1)[1] + ".original")]
        assert torch.equal(state[k], w0 + u), k


def test_lora_rank_alpha_are_args_and_a_bad_rank_stops_with_a_message(tiny):
    assert (baselines.Args.lora_rank, baselines.Args.lora_alpha) == (16, 32.0)
    assert baselines.parse(["--method", "lora"]).lr == baselines.LORA_LR_FACTOR * common.FT_RECIPES["miniworld"]["lr"]
    model, task, _ = tiny
    with pytest.raises(SystemExit, match="--lora-rank 33: choose 1 to 32"):
        wiring("lora", model, task, lora_rank=33)


def test_wise_of_a_lora_run_scales_its_low_rank_update(tiny):
    """WiSE-FT at α' between θ0 and a LoRA run's merged weights = θ0 + α'·(α/r)·B·A on the targets."""
    import merge

    model, task, _ = tiny
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = wiring("lora", model, task, lora_rank=3, lora_alpha=6.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, baselines.LowRank):
                m.B.normal_()
        model.head.add_(1.0)
    update = {k: v.detach().clone() for k, v in lora_update(model).items()}
    recipe.merge()
    half = merge.wise(state0, model.state_dict(), 0.5)
    assert len(update) == 4
    for k, v in half.items():
        if k in update:
            assert torch.allclose(v, state0[k] + 0.5 * update[k], atol=1e-6), k
        elif k == "head":
            assert torch.allclose(v, state0[k] + 0.5, atol=1e-6)
        else:
            assert torch.equal(v, state0[k]), k  # every other tensor stays θ0


def test_lora_resumes_from_a_mid_run_checkpoint_and_evaluates_a_trained_final_pt(tmp_path, folder_data, tiny_model):
    micro = ["--method", "lora", "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4",
             "--batch-size", "8", "--eval-every", "0", "--ckpt-every", "2", "--workers", "0", "--threads", "1"]
    run_script([str(REPO / "baselines.py"), *micro, "--out", "runs/a"], cwd=tmp_path)
    run_script([str(REPO / "baselines.py"), *micro, "--out", "runs/b", "--keep-checkpoints"], cwd=tmp_path)
    b = tmp_path / "runs" / "b"
    assert any(".A" in k for k in torch.load(b / "ckpt" / "step_2.pt", weights_only=False)["model"])  # A, B resumable
    (b / "final.pt").unlink()
    (b / "results.jsonl").unlink()
    (b / "ckpt" / "step_4.pt").unlink(missing_ok=True)
    run_script([str(REPO / "baselines.py"), *micro, "--out", "runs/b", "--resume"], cwd=tmp_path)  # from step 2
    a = torch.load(tmp_path / "runs" / "a" / "final.pt", weights_only=False)["model"]
    assert set(a) == set(torch.load(b / "final.pt", weights_only=False)["model"])
    assert all(torch.equal(v, torch.load(b / "final.pt", weights_only=False)["model"][k]) for k, v in a.items())
    (b / "results.jsonl").unlink()  # trained, rows lost: --resume evaluates final.pt's merged weights
    proc = run_script([str(REPO / "baselines.py"), *micro, "--out", "runs/b", "--resume"], cwd=tmp_path)
    assert "holds the trained weights" in proc.stdout and (b / "results.jsonl").is_file()


def test_lpft_without_an_lp_run_says_what_to_run(tiny, tmp_path):
    model, task, _ = tiny
    with pytest.raises(SystemExit, match="--method lp"):
        wiring("lpft", model, task, lp_run=str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------ end to end
DRIVER = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = ["baselines.py", *argv]
    runpy.run_path({script!r}, run_name="__main__")
"""


def test_every_method_end_to_end(tmp_path, folder_data, tiny_model):
    runs = tmp_path / "runs"
    micro = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4",
             "--batch-size", "8", "--eval-every", "2", "--ckpt-every", "2", "--crop-scale", "0.5"]
    extra = {"lpft": ["--lp-run", str(runs / "lp")], "ema": ["--ema-decay", "1", "--keep-checkpoints"], "lp": ["--lr", "1e-2"]}
    argvs = [["--method", m, *micro, "--out", str(runs / m), *extra.get(m, [])] for m in baselines.METHODS]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(script=str(REPO / "baselines.py")), json.dumps(argvs)],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = [json.loads(line) for line in (runs / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == set(baselines.METHODS)
    assert all({r["split"] for r in rows if r["method"] == m} == {"test", "sketch"} for m in baselines.METHODS)
    final = {m: torch.load(runs / m / "final.pt", weights_only=False)["model"] for m in baselines.METHODS}
    logs = {m: [json.loads(x) for x in (runs / m / "log.jsonl").read_text().splitlines()]
            for m in baselines.METHODS if m != "zeroshot"}
    theta0 = final["zeroshot"]

    # LP: image and text towers bit-identical to θ0, only the head moved.
    for k, v in final["lp"].items():
        assert torch.equal(v, theta0[k]) != (k == "head"), k
    # LP-FT starts from the LP run's head.
    assert f"lpft: head from {runs / 'lp' / 'final.pt'}" in proc.stdout
    task = common.load_task("folder", folder_data)
    model, _, _ = common.load_classifier(runs / "zeroshot")
    baselines.lpft(model, baselines.Args(method="lpft", model=tiny_model, lp_run=str(runs / "lp")), task)
    assert torch.equal(model.head, final["lp"]["head"])
    # Scratch-FT: a zero head gives uniform logits, so the first step's CE is exactly log K.
    assert logs["scratch"][0]["ce"] == pytest.approx(math.log(4), abs=1e-6)
    # The regularisers are 0 on the first step (θ = θ0; KD / FeatKD up to the teacher's round-off) and
    # grow once θ moved.
    for m in ("l2sp", "kd", "featkd"):
        assert abs(logs[m][0][m]) < 1e-6 < logs[m][-1][m], m
    # EMA with decay 1 evaluates θ0 exactly although the live weights trained, and its held-out checks
    # during training scored the average (θ0), not the live weights.
    assert all(torch.equal(v, theta0[k]) for k, v in final["ema"].items())
    zs = common.load_run(runs / "zeroshot", "cpu")
    zs_heldout = common.evaluate_split(zs.model, zs.task.heldout, zs.task, zs.eval_tf, torch.device("cpu"))["acc"]
    assert logs["ema"][1]["heldout_acc"] == zs_heldout
    assert not list((runs / "ft" / "ckpt").glob("step_*.pt"))  # a finished run keeps final.pt, not its step checkpoints
    live = torch.load(runs / "ema" / "ckpt" / "step_2.pt", weights_only=False)["model"]  # kept: --keep-checkpoints
    assert not torch.equal(live["clip.visual.conv1.weight"], theta0["clip.visual.conv1.weight"])
    # LoRA: final.pt holds the merged weights under FT's keys; only the targeted projections and the head moved.
    assert set(final["lora"]) == set(final["ft"])
    assert {k for k, v in final["lora"].items() if not torch.equal(v, theta0[k])} == {
        "head", *(f"clip.visual.transformer.resblocks.0.{t}" for t in VIT_TARGETS)}
    # FLYP: the text tower trained and the saved head is the zero-shot head of that text tower.
    assert not torch.equal(final["flyp"]["clip.token_embedding.weight"], theta0["clip.token_embedding.weight"])
    model, _, _ = common.load_classifier(runs / "flyp")
    rebuilt = common.zeroshot_head(model.clip, model.tokenizer, task.classnames, task.templates)
    assert torch.allclose(final["flyp"]["head"], rebuilt, atol=1e-6)
    assert not torch.allclose(final["flyp"]["head"], theta0["head"], atol=1e-4)


# --------------------------------------------------------------------------------- SigLIP
def test_flyp_on_siglip_trains_with_the_sigmoid_loss_and_its_bias(tiny_siglip):
    """A model with a logit bias (SigLIP) was pretrained with the sigmoid loss: FLYP's loss is that one,
    with same-class pairs masked, and the bias gets a gradient."""
    model, task, batch = classifier_task_batch(tiny_siglip)
    recipe = wiring("flyp", model, task)
    assert model.clip.logit_bias.requires_grad
    rows = recipe.loss_fn.embed(model, batch, 0)
    scale, bias = model.scale, model.clip.logit_bias
    loss, terms = recipe.loss_fn.loss(rows, scale, bias)
    want = common.sigmoid_contrastive_loss(rows["image"], rows["text"], scale, bias, rows["label"], "masked")
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and terms["bias"].item() == -10.0
    assert abs(loss.item() - common.clip_contrastive_loss(rows["image"], rows["text"], scale, rows["label"], "masked").item()) > 1
    loss.backward()
    assert model.clip.logit_bias.grad.abs().item() > 0 and model.clip.logit_scale.grad is not None


def test_flyp_on_siglip_end_to_end_moves_the_bias_and_wise_interpolates_it(tmp_path, folder_data, tiny_siglip):
    import merge

    proc = run_script([str(REPO / "baselines.py"), "--method", "flyp", "--data", "folder", "--data-root", folder_data,
                       "--model", tiny_siglip, "--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--workers", "0",
                       "--out", "runs/r"], cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    log = [json.loads(x) for x in (tmp_path / "runs" / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["bias"] for r in log][0] == -10.0 and log[-1]["bias"] != -10.0  # the logged bias is the one trained
    run = common.load_run(tmp_path / "runs" / "r", torch.device("cpu"))
    state0, state1 = merge.run_endpoints(run, torch.device("cpu"))
    b0, b1 = state0["clip.logit_bias"].item(), state1["clip.logit_bias"].item()
    assert b0 == -10.0 and abs(b1 - b0) > 1e-3  # final.pt carries the trained bias
    assert merge.wise(state0, state1, 0.5)["clip.logit_bias"].item() == pytest.approx((b0 + b1) / 2, abs=1e-6)


def test_generalized_zero_shot_trains_the_image_tower_under_the_fixed_zero_shot_head(tiny_model, folder_data, tmp_path):
    """--unseen-classes: FT on the seen classes with the zero-shot head over all 4 classes held fixed (bitwise
    θ0's) while the image tower trains; every test split's S, U and H are the per-class accuracies of its
    logits over all classes, by hand; `evaluate.py eval` of the finished run rebuilds the same task and
    rows, and the table shows them. LP, LP-FT and Scratch-FT (whose head trains or starts elsewhere) stop."""
    (tmp_path / "unseen.txt").write_text("owl\nred_fox\n")
    flags = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4", "--batch-size", "8",
             "--workers", "0", "--unseen-classes", str(tmp_path / "unseen.txt")]
    run_script([str(REPO / "baselines.py"), "--method", "ft", *flags, "--out", "runs/ft"], cwd=tmp_path)
    final = torch.load(tmp_path / "runs" / "ft" / "final.pt", weights_only=False)["model"]
    run = common.load_run(tmp_path / "runs" / "ft", "cpu")
    theta0 = common.run_theta0(run, "cpu").state_dict()
    assert run.task.unseen == [2, 3] and final["head"].shape[0] == 4
    assert torch.equal(final["head"], theta0["head"])  # the zero-shot head over all classes, untouched
    assert not torch.equal(final["clip.visual.conv1.weight"], theta0["clip.visual.conv1.weight"])
    rows = {r["split"]: r for r in map(json.loads, (tmp_path / "runs" / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"test", "sketch"} and rows["test"]["config"]["unseen_classes"] == str(tmp_path / "unseen.txt")
    for split in run.task.tests:
        logits, labels, _ = common.split_logits(run.model, split, run.task, run.eval_tf, torch.device("cpu"))
        pred, labels = logits.argmax(-1).tolist(), labels.tolist()
        per_class = [sum(p == y == k for p, y in zip(pred, labels)) / labels.count(k) for k in range(4)]
        s, u = (per_class[0] + per_class[1]) / 2, (per_class[2] + per_class[3]) / 2
        row = rows[split.name]
        assert (row["acc_seen"], row["acc_unseen"]) == (pytest.approx(s), pytest.approx(u))
        assert row["h"] == pytest.approx(2 * s * u / (s + u) if s + u else 0.0)
        assert row["acc"] == pytest.approx(sum(p == y for p, y in zip(pred, labels)) / len(labels))
    run_script([str(REPO / "evaluate.py"), "eval", "--ckpt", "runs/ft", "--workers", "0"], cwd=tmp_path)
    again = [json.loads(x) for x in (tmp_path / "runs" / "ft" / "results.jsonl").read_text().splitlines()][-2:]
    for r in again:
        assert {k: r[k] for k in ("acc", "nll", "acc_seen", "acc_unseen", "h", "config_id")} == \
            {k: rows[r["split"]][k] for k in ("acc", "nll", "acc_seen", "acc_unseen", "h", "config_id")}
    table = run_script([str(REPO / "evaluate.py"), "table", "runs"], cwd=tmp_path).stdout
    assert "| S test | U test | H test | S sketch | U sketch | H sketch |" in table
    # FLYP trains the text tower, and classifies with the head rebuilt from it over all classes.
    run_script([str(REPO / "baselines.py"), "--method", "flyp", *flags, "--out", "runs/flyp"], cwd=tmp_path)
    flyp = common.load_run(tmp_path / "runs" / "flyp", "cpu").model
    assert torch.equal(flyp.head, common.zeroshot_head(flyp.clip, flyp.tokenizer, run.task.classnames, run.task.templates))
    assert not torch.equal(flyp.head, theta0["head"]) and flyp.head.shape[0] == 4
    for method in ("lp", "lpft", "scratch"):
        proc = run_script([str(REPO / "baselines.py"), "--method", method, *flags], cwd=tmp_path, check=False)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(
            f"error: --unseen-classes holds the zero-shot head over all classes fixed, and --method {method}")
