"""common.py: metrics against hand computations, zero-shot heads, the training loop (resume, held-out
selection, the logit-scale clamp), the one FT recipe, actionable errors on bad input, CLIP's contrastive
loss, threads, and the rule that common.py holds only what the method files share."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_script, write_images

import common


# ---------------------------------------------------------------------------------------- metrics
def test_ece_and_nll_match_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 0])
    m = common.classification_metrics(probs.log(), labels)
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (wrong); each sits alone in its bin
    # of width 1/15, so ECE = mean |conf - correct|.
    assert m["acc"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.3 + 0.8) / 4, abs=1e-6)
    assert m["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.7) + np.log(0.2)) / 4, abs=1e-6)


def test_ece_zero_for_perfectly_calibrated_toy():
    # 10 samples at confidence 0.8 of which exactly 8 are right; 5 at confidence 0.6 with 3 right.
    p_hi = torch.tensor([[0.8, 0.2]]).repeat(10, 1)
    p_lo = torch.tensor([[0.6, 0.4]]).repeat(5, 1)
    labels = torch.tensor([0] * 8 + [1] * 2 + [0] * 3 + [1] * 2)
    m = common.classification_metrics(torch.cat([p_hi, p_lo]).log(), labels)
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------- zero-shot head
def test_zeroshot_head_shape_norm_and_template_order(tiny_model):
    clip, tok, _ = common.load_clip(tiny_model)
    classes, templates = ["cat", "dog", "owl"], ["a photo of a {}.", "a sketch of a {}.", "art of the {}."]
    head = common.zeroshot_head(clip, tok, classes, templates)
    assert head.shape == (3, 32)
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-5)
    reordered = common.zeroshot_head(clip, tok, classes, templates[::-1])
    assert torch.allclose(head, reordered, atol=1e-5)
    per_template = common.template_embeddings(clip, tok, classes, templates)  # [K, T, D]
    assert per_template.shape == (3, 3, 32)
    assert torch.allclose(torch.nn.functional.normalize(per_template.mean(1), dim=-1), head, atol=1e-5)
    other = common.zeroshot_head(clip, tok, ["cat", "dog", "fox"], templates)
    assert not torch.allclose(head[2], other[2], atol=1e-3)



@pytest.mark.parametrize("custom_text", [False, True])  # open_clip's CLIP and CustomTextCLIP (TextTransformer)
def test_encode_text_cut_padding_equals_full_context(tiny_model, custom_text):
    import open_clip

    common.resolve_model(tiny_model)
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-vit", force_custom_text=custom_text)
    tok = open_clip.get_tokenizer("tiny-vit")
    tokens = tok(["a cat.", "a photo of a small dog on the grass", "owl"])  # [3, 16], BPE, padded with 0
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # there is padding to cut
    for p in clip.parameters():
        p.grad = None
    full = clip.encode_text(tokens, normalize=True)  # [3, D]
    (full * torch.arange(full.shape[1])).sum().backward()
    grads_full = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
    clip.zero_grad(set_to_none=True)
    cut = common.encode_text(clip, tokens)
    (cut * torch.arange(cut.shape[1])).sum().backward()
    assert torch.allclose(cut, full, atol=1e-6)
    assert grads_full.keys() == {n for n, p in clip.named_parameters() if p.grad is not None}
    for n, g in grads_full.items():
        assert torch.allclose(dict(clip.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5), n
    clip.text_pool_type = "last"  # a tower not pooled at EOT: cutting would change it, so it runs in full
    if custom_text:
        clip.text.pool_type = "last"
    assert torch.allclose(common.encode_text(clip, tokens), clip.encode_text(tokens, normalize=True), atol=1e-6)


def test_encode_text_of_a_siglip_tower_is_its_own_encode_text(tiny_siglip):
    """SigLIP's text tower (bidirectional, pooled at the last position of the context, HF tokenizer
    padding to the context): encode_text runs it on the full context, equal to clip.encode_text."""
    torch.manual_seed(0)
    clip, tok, _ = common.load_clip(tiny_siglip)
    tokens = tok(["a cat.", "a photo of the small dog on the grass", "owl"])  # [3, 16]
    assert tokens.shape == (3, 16) and (tokens[:, -1] == 0).all() and (tokens[0, :5] == torch.tensor([6, 18, 17, 2, 0])).all()
    with torch.no_grad():
        clip.text.positional_embedding.normal_()  # every position matters to a tower pooled at the last one
    assert torch.allclose(common.encode_text(clip, tokens), clip.encode_text(tokens, normalize=True), atol=1e-6)
    cut = tokens[:, :tokens.argmax(-1).max() + 1]  # what cutting at the argmax id would feed it: another text to this tower
    assert not torch.allclose(clip.encode_text(cut, normalize=True), clip.encode_text(tokens, normalize=True), atol=1e-3)


# --------------------------------------------------------------------------------- training loop
def micro_args(root, model, out, **kw):
    base = dict(data_root=root, model=model, steps=6, batch_size=8, lr=1e-3, eval_every=0, ckpt_every=3, out=str(out),
                workers=0, crop_scale=0.5)
    return common.make_args(common.TrainArgs, "folder", **{**base, **kw})


def ft_loss(model, batch, step):
    loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
    return loss, {"ce": loss.detach()}


def train_run(args, loss_fn=ft_loss):
    env = common.setup(args, "ft")
    common.set_trainable(env.model)
    common.train(env, loss_fn, args)
    return env.model.state_dict()


def test_resume_gives_identical_weights(tmp_path, folder_data, tiny_model):
    straight = train_run(micro_args(folder_data, tiny_model, tmp_path / "a"))

    class Interrupted(Exception):
        pass

    def interrupted(model, batch, step):
        if step == 4:  # four steps done, the last one after the step-3 checkpoint
            raise Interrupted
        return ft_loss(model, batch, step)

    with pytest.raises(Interrupted):
        train_run(micro_args(folder_data, tiny_model, tmp_path / "b"), interrupted)
    assert (tmp_path / "b" / "ckpt" / "step_3.pt").exists()
    resumed = train_run(micro_args(folder_data, tiny_model, tmp_path / "b", resume=True))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    changed = train_run(micro_args(folder_data, tiny_model, tmp_path / "c", seed=1))
    assert not torch.equal(changed["head"], straight["head"])


def test_setup_train_finish_rewrite_no_argument_and_env_stays_as_setup_made_it(tmp_path, folder_data, tiny_model):
    """No hidden state: the parsed arguments come out as they went in (the thread count used is recorded
    apart, under "machine"), Env cannot be changed, and train hands finish what it needs."""
    import dataclasses

    args = micro_args(folder_data, tiny_model, tmp_path / "a", steps=2, threads=0)
    before = dataclasses.asdict(args)
    env = common.setup(args, "ft")
    common.set_trainable(env.model)
    trained = common.train(env, ft_loss, args)
    assert (trained.step, trained.selected, trained.head_from_text, trained.model is env.model) == (2, False, False, True)
    common.finish(env, args, trained)
    assert dataclasses.asdict(args) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.run = None
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    assert saved["threads"] == 0 and saved["machine"] == {"threads": env.threads, "workers": 0, "processes": 1}
    assert env.threads >= 1


def test_trained_logit_scale_is_clamped_after_every_step(tmp_path, folder_data, tiny_model):
    args = micro_args(folder_data, tiny_model, tmp_path / "a", steps=1, lr=0.0)
    env = common.setup(args, "ft")
    common.set_trainable(env.model, scale=True)
    with torch.no_grad():
        env.model.clip.logit_scale.fill_(10.0)  # s = e^10, far above open_clip's bound of 100
    common.train(env, ft_loss, args)
    assert env.model.clip.logit_scale.item() == pytest.approx(math.log(100))
    frozen = common.setup(micro_args(folder_data, tiny_model, tmp_path / "b", steps=1, lr=0.0), "ft")
    common.set_trainable(frozen.model)
    with torch.no_grad():
        frozen.model.clip.logit_scale.fill_(10.0)
    common.train(frozen, ft_loss, args.__class__(**{**vars(args), "out": str(tmp_path / "b")}))
    assert frozen.model.clip.logit_scale.item() == 10.0  # a frozen scale is the model's own, untouched


def test_presets_hold_only_departures_from_the_ft_recipe():
    """One FT recipe per --data (common.FT_RECIPES): a method's PRESETS may not repeat it (or its Args
    defaults), and may override a recipe field only where its paper departs from FT (listed here; a
    new departure has to be added consciously)."""
    import arf
    import baselines
    import car_ft
    import carot
    import lipsum_ft

    departures = {("baselines:lp", "lr"), ("baselines:lp", "weight_decay"), ("baselines:flyp", "batch_size"),
                  ("baselines:flyp", "steps"), ("carot", "batch_size"), ("carot", "steps"), ("baselines:lora", "lr")}
    presets = {"lipsum_ft": (lipsum_ft.Args, lipsum_ft.PRESETS), "car_ft": (car_ft.Args, car_ft.PRESETS),
               "arf": (arf.Args, arf.PRESETS), "carot": (carot.Args, carot.PRESETS)}
    presets.update({f"baselines:{m}": (baselines.Args, p) for m, p in baselines.PRESETS.items()})
    for name, (args_cls, by_data) in presets.items():
        assert set(by_data) <= set(common.FT_RECIPES), name
        defaults = {f.name: f.default for f in common.dataclasses.fields(args_cls)}
        for data, values in by_data.items():
            recipe = common.FT_RECIPES[data]
            for key, value in values.items():
                assert key in defaults, (name, data, key)
                assert value != recipe.get(key, defaults[key]), f"{name} PRESETS[{data!r}] repeats {key}={value!r}"
                assert key not in recipe or (name, key) in departures, f"{name} PRESETS[{data!r}] drifts from FT's {key}"
    lp = baselines.parse(["--method", "lp", "--data", "miniworld"])
    assert (lp.lr, lp.weight_decay, lp.steps) == (1e-3, 0.0, 300)  # LP: 10x FT's lr, FT's steps


def test_rerun_into_existing_run_refuses(tmp_path, folder_data, tiny_model, monkeypatch):
    train_run(micro_args(folder_data, tiny_model, tmp_path / "a", steps=1))
    monkeypatch.setattr(common, "load_task", lambda *a: pytest.fail("the refusal must come before the data loads"))
    with pytest.raises(SystemExit, match="--resume"):
        train_run(micro_args(folder_data, tiny_model, tmp_path / "a", steps=1))


def test_nan_loss_stops_with_step_and_terms(tmp_path, folder_data, tiny_model):
    args = micro_args(folder_data, tiny_model, tmp_path / "a")
    env = common.setup(args, "ft")
    common.set_trainable(env.model)
    bad = lambda model, batch, step: (model(batch["image"]).sum() * float("nan"), {"ce": 1.0})  # noqa: E731
    with pytest.raises(common.NonFiniteLoss, match="step 0"):
        common.train(env, bad, args)
    assert all(torch.isfinite(p).all() for p in env.model.parameters())  # NaN gradients, but no optimiser step


class SomeUnreadable:
    """10 images, #3 and #4 unreadable: what TransformedImages needs of an image list."""
    labels = list(range(10))

    def __len__(self):
        return 10

    def load(self, i):
        return None if i in (3, 4) else i


def test_an_unreadable_image_is_replaced_by_the_next_readable_one_of_its_stream_under_every_partitioning():
    def drawn(world, accum, start=0):  # the samples of steps start..2 of every process and micro-batch, in stream order
        out = []
        for rank in range(world):
            sampler = common.StepBatchSampler(10, 8, accum, rank, world, seed=0, start=start, total=3)
            data = common.TransformedImages(SomeUnreadable(), lambda img: torch.tensor(float(img)), stream=sampler.sample)
            out.append([[data[p] for p in micro] for micro in sampler])
        return [(s["index"], float(s["image"]), s["skipped"])
                for step in range(3 - start) for a in range(accum) for r in range(world) for s in out[r][step * accum + a]]

    one = drawn(1, 1)
    assert len(one) == 24  # full micro-batches
    assert drawn(2, 1) == drawn(1, 2) == drawn(2, 2) == one and drawn(2, 1, start=1) == one[8:]  # resumed at step 1
    sampler = common.StepBatchSampler(10, 8, 1, 0, 1, seed=0, start=0, total=3)
    for p, (index, image, skipped) in enumerate(one):
        following = [sampler.sample(q)[0] for q in range(p, p + 3)]  # positions p, p + 1, p + 2 of the stream
        assert index == image == next(i for i in following if i not in (3, 4))
        assert skipped == following[:following.index(index)]
    assert sorted({i for *_, skipped in one for i in skipped}) == [3, 4]  # both drawn in 24 draws of 10 images


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--data", "imagenet", "--data-root", "/nonexistent"], "Expected layout"),
    (["--data", "cifar"], "unknown --data"),
    (["--model", "ViT-Q-99"], "unknown --model"),
    (["--model", "ViT-B-32", "--pretrained", "/no/such/weights.pt"], "neither a file nor a tag"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr", "-1"], "--lr must be >= 0"),
])
def test_bad_arguments_give_one_clear_message(tmp_path, extra, message):
    """(the grad-accum, steps and miniclip-vocabulary cases are below, each with its own command)"""
    proc = run_script([str(REPO / "baselines.py"), "--method", "ft", *extra], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_weights_file_that_is_not_a_checkpoint(tmp_path, tiny_model):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="could not load"):
        common.load_clip(tiny_model, str(junk))



def test_class_list_mismatch_between_checkpoint_and_data(tmp_path, folder_data, tiny_model):
    env = common.setup(micro_args(folder_data, tiny_model, tmp_path / "b"), "ft")
    common.finish(env, micro_args(folder_data, tiny_model, tmp_path / "b"))  # the untrained model is the run's
    other = tmp_path / "other"
    for split in ("train", "test"):
        for k, name in enumerate(["ant", "bee"]):
            write_images(other / split / name, 3, seed=k)
    task = common.load_task("folder", str(other))
    with pytest.raises(SystemExit, match="different classes"):
        common.load_classifier(tmp_path / "b", task=task)



# ------------------------------------------------------------------------ CLIP's contrastive loss
def hand_contrastive(img, txt, s, groups):
    """Symmetric InfoNCE with one python loop per direction and row, in float64."""
    img, txt, B = img.double().tolist(), txt.double().tolist(), len(img)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(B):
            row = [s * sum(x * y for x, y in zip(a[i], b[j])) for j in range(B)]
            lse = math.log(sum(math.exp(r) for r in row))
            pos = [j for j in range(B) if groups[j] == groups[i]]
            total -= sum(row[j] - lse for j in pos) / len(pos) / B
    return total / 2


@pytest.mark.parametrize("groups", [None, [0, 1, 0, 2, 1, 0]])
def test_contrastive_loss_matches_hand_loop(groups):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    got = common.clip_contrastive_loss(img, txt, torch.tensor(7.3), None if groups is None else torch.tensor(groups))
    want = hand_contrastive(img, txt, 7.3, groups or list(range(6)))
    assert abs(got.item() - want) < 1e-5


def test_contrastive_loss_closed_forms():
    x = F.normalize(torch.randn(4, 8), dim=-1)
    same = x[:1].expand(4, 8)
    assert abs(common.clip_contrastive_loss(same, same, 10.0).item() - math.log(4)) < 1e-5  # no signal: log B
    eye = torch.eye(4, 8)
    assert common.clip_contrastive_loss(eye, eye, 100.0).item() < 1e-30 + 1e-6  # perfectly aligned pairs
    # duplicated prompts with targets spread over the duplicates: identical texts are not negatives
    labels = torch.tensor([0, 0, 1, 1])
    prompts = eye[[0, 0, 2, 2]]
    grouped = common.clip_contrastive_loss(prompts, prompts, 100.0, labels).item()
    assert abs(grouped - math.log(2)) < 1e-4  # the mass is split over two equal positives, nothing else


def hand_sigmoid(img, txt, s, b, groups, duplicates):
    """SigLIP's loss with one python loop over the pairs, in float64: y = +1 for i = j (and for i ≠ j of
    one group with duplicates="positive"); a pair i ≠ j of one group is skipped with "masked"."""
    img, txt, B = img.double().tolist(), txt.double().tolist(), len(img)
    total = 0.0
    for i in range(B):
        for j in range(B):
            same = groups[i] == groups[j]
            if i != j and same and duplicates == "masked":
                continue
            y = 1.0 if i == j or (same and duplicates == "positive") else -1.0
            z = s * sum(x * t for x, t in zip(img[i], txt[j])) + b
            total += math.log1p(math.exp(-y * z))  # −log σ(y z)
    return total / B


def test_sigmoid_loss_equals_open_clip_siglip_loss_and_a_hand_loop():
    """Golden: open_clip's SigLipLoss (one process) on the same pairs, scale and bias; the duplicate rules
    against a hand loop; and pretraining_loss picks it exactly when there is a bias."""
    from open_clip.loss import SigLipLoss

    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(7, 5, generator=g), dim=-1) for _ in range(2))
    scale, bias = torch.tensor(9.0), torch.tensor(-4.0)
    want = SigLipLoss()(img, txt, scale, bias)
    assert abs(common.sigmoid_contrastive_loss(img, txt, scale, bias).item() - want.item()) < 1e-5
    assert abs(common.pretraining_loss(img, txt, scale, bias).item() - want.item()) < 1e-5
    assert common.pretraining_loss(img, txt, scale).item() == common.clip_contrastive_loss(img, txt, scale).item()
    assert abs(common.clip_contrastive_loss(img, txt, scale).item() - want.item()) > 0.1  # a different loss
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    for rule in ("positive", "masked"):
        got = common.sigmoid_contrastive_loss(img, txt, scale, bias, groups, rule).item()
        assert abs(got - hand_sigmoid(img, txt, 9.0, -4.0, groups.tolist(), rule)) < 1e-5, rule
    distinct = torch.arange(7)  # no duplicates: both rules are SigLIP's loss
    assert abs(common.sigmoid_contrastive_loss(img, txt, scale, bias, distinct, "masked").item() - want.item()) < 1e-5


def test_bias_gradient_counts_once_per_step_and_trains_with_the_scale(tiny_siglip):
    clip, tok, _ = common.load_clip(tiny_siglip)
    model = common.set_trainable(common.ClipClassifier(clip, torch.zeros(2, 32), tok), scale=True)
    assert model.clip.logit_bias.requires_grad and model.clip.logit_scale.requires_grad
    assert not common.set_trainable(model).clip.logit_bias.requires_grad  # frozen with the scale (FT)
    b = torch.tensor(-3.0, requires_grad=True)
    once = common.once_per_step(b, 4)
    (5 * once).backward()
    assert once.item() == -3.0 and b.grad.item() == pytest.approx(5 / 4)
    assert common.once_per_step(None, 4) is None and common.once_per_step(b, 1) is b


# ------------------------------------------------------------------------ a first hour without surprises
def first_hour(tmp_path, *argv):
    proc = run_script([str(REPO / "baselines.py"), *argv], cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    return proc.returncode, out


def test_miniclip_on_real_class_names_says_what_to_pass(tmp_path, folder_data):
    code, out = first_hour(tmp_path, "--method", "ft", "--data", "folder", "--data-root", folder_data, "--out", "r")
    assert code != 0 and "--model miniclip only knows the miniworld's words" in out and "--model ViT-B-16 --pretrained openai" in out


@pytest.mark.parametrize("argv, message", [
    (["--grad-accum", "3"], "--batch-size 8 does not split into --grad-accum 3 equal micro-batches"),
    (["--steps", "0"], "the untrained model is `python baselines.py --method zeroshot`"),
])
def test_bad_step_arguments_stop_before_anything_is_written(tmp_path, folder_data, tiny_model, argv, message):
    code, out = first_hour(tmp_path, "--method", "ft", "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
                           "--batch-size", "8", "--out", "r", *argv)
    assert code != 0 and message in out and not (tmp_path / "r").exists()


def test_a_weights_file_that_is_not_a_miniclip_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, out = first_hour(tmp_path, "--method", "zeroshot", "--pretrained", str(tmp_path / "junk.pt"), "--out", "r")
    assert code != 0 and "is not a miniclip checkpoint" in out


def test_miniclip_loads_without_the_random_weights_false_alarm(capsys, caplog):
    common.load_clip("miniclip")
    assert "No pretrained weights loaded" not in capsys.readouterr().err + caplog.text


def test_resume_of_a_finished_run_says_it_is_finished_and_a_resumed_log_has_each_step_once(tmp_path, folder_data, tiny_model):
    args = micro_args(folder_data, tiny_model, tmp_path / "a", steps=4, ckpt_every=2)

    def interrupted(model, batch, step):
        if step == 3:  # Ctrl-C during step 3, after the step-2 checkpoint
            raise KeyboardInterrupt
        return ft_loss(model, batch, step)

    with pytest.raises(SystemExit, match=r"interrupted. Last checkpoint: .*step_2\.pt; continue with the same command and --resume"):
        train_run(args, interrupted)
    assert [json.loads(x)["step"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    train_run(micro_args(folder_data, tiny_model, tmp_path / "a", steps=4, ckpt_every=2, resume=True))
    assert [json.loads(x)["step"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    done = micro_args(folder_data, tiny_model, tmp_path / "a", steps=4, resume=True)
    common.finish(common.setup(done, "ft"), done)  # final.pt and the results rows: the run is finished
    with pytest.raises(SystemExit, match="is finished"):
        common.setup(micro_args(folder_data, tiny_model, tmp_path / "a", steps=4, resume=True), "ft")


def test_resume_refuses_arguments_that_change_the_run_and_a_run_that_is_not_there(tmp_path, folder_data, tiny_model):
    """--resume with other flags would silently train on with the old lr and a jumping schedule: every
    difference that changes the result is refused and named; threads, workers and the evaluation batch may
    change. --resume where no run is says so instead of starting fresh."""
    base = [str(REPO / "baselines.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
            "--batch-size", "8", "--ckpt-every", "4", "--eval-every", "0", "--out", str(tmp_path / "x")]
    run_script([*base, "--steps", "12", "--keep-checkpoints"], cwd=tmp_path)
    for f in ("final.pt", "results.jsonl"):  # as if killed after its last checkpoint
        (tmp_path / "x" / f).unlink()
    proc = run_script([*base, "--steps", "20", "--lr", "1e-3", "--resume"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--resume would change the run" in proc.stderr and "--steps 12 -> 20" in proc.stderr and "--lr 1e-05 -> 0.001" in proc.stderr
    proc = run_script([*base, "--steps", "12", "--resume", "--threads", "1", "--eval-batch-size", "7"], cwd=tmp_path)
    assert "resuming from" in proc.stdout and (tmp_path / "x" / "results.jsonl").is_file()
    proc = run_script([*base[:-1], str(tmp_path / "nothing"), "--steps", "12", "--resume"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "holds no run to resume" in proc.stderr and "Traceback" not in proc.stderr


def test_unreadable_training_images_are_named_once_and_empty_classes_leave_the_label_space(tmp_path, tiny_model, capsys):
    root = tmp_path / "data"
    for split, n in (("train", 6), ("test", 2)):
        for k, name in enumerate(["cat", "dog"]):
            write_images(root / split / name, n, seed=k)
    (root / "train" / "owl").mkdir()  # a class folder with no images
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    args = micro_args(str(root), tiny_model, tmp_path / "run", steps=6, batch_size=4, ckpt_every=0)
    env = common.setup(args, "ft")
    assert env.task.classnames == ["cat", "dog"]
    common.set_trainable(env.model)
    common.train(env, ft_loss, args)
    out = capsys.readouterr().out
    assert "dropping 1 class(es) with no training images from the label space: owl" in out
    assert "1 unreadable training image(s), each replaced by the next readable image of its stream" in out
    assert out.count(str(root / "train" / "cat" / "broken.jpg")) == 1


def test_bf16_autocast_evaluation_agrees_with_float32_and_scores_in_float32(tmp_path, folder_data, monkeypatch):
    """The encoders may run under bf16 autocast; the logits, softmax, ECE and NLL are float32 (at s = 100
    bf16's spacing near |z| = 16-32 is 0.125 logit units). A random-weight ViT-B-32, CPU autocast."""
    torch.manual_seed(0)
    clip, tokenizer, pp = common.load_clip("ViT-B-32")
    task = common.load_task("folder", folder_data)
    model = common.ClipClassifier(clip, common.zeroshot_head(clip, tokenizer, task.classnames, task.templates), tokenizer)
    tf = common.image_transforms(pp, 1.0)[1]
    cpu = torch.device("cpu")
    full = {s.name: common.split_logits(model, s, task, tf, cpu) for s in task.tests}
    monkeypatch.setattr(common, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    half = {s.name: common.split_logits(model, s, task, tf, cpu) for s in task.tests}
    for name in full:
        assert half[name][0].dtype == torch.float32
        acc = [common.classification_metrics(*r[:2])["acc"] for r in (full[name], half[name])]
        assert abs(acc[0] - acc[1]) <= 0.001, (name, acc)
        assert 0 < (half[name][0] - full[name][0]).abs().max() < 1.0  # bf16 encoders did run, and stay close


def test_select_heldout_evaluates_the_best_held_out_step_and_says_which(tmp_path, tiny_model):
    from conftest import COLOURS

    root, out = tmp_path / "data", tmp_path / "run"
    for split, n in (("train", 40), ("test", 4)):  # 160 training images: a held-out slice of 16
        for k, name in enumerate(["cat", "dog", "fox", "owl"]):
            write_images(root / split / name, n, seed=k + 10 * (split == "test"), colour=COLOURS[k])
    run_script([str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", str(root), "--model",
                tiny_model, "--steps", "6", "--batch-size", "8", "--lr", "3e-2", "--warmup", "0", "--eval-every", "1",
                "--workers", "0", "--select", "heldout", "--out", str(out)], cwd=tmp_path)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    accs = [r["heldout_acc"] for r in log]
    assert len(accs) == 6 and len(set(accs)) > 1  # every step scored on the held-out slice, the last one too
    chosen = log[accs.index(max(accs))]["step"]  # the earliest step with the best held-out accuracy
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["selected_step"], r["step"], r["select"]) for r in rows} == {(chosen, chosen, "heldout")}
    run = common.load_run(out, torch.device("cpu"))  # final.pt holds the chosen step's weights
    assert common.evaluate_split(run.model, run.task.heldout, run.task, run.eval_tf, torch.device("cpu"))["acc"] == max(accs)
    proc = run_script([str(REPO / "baselines.py"), "--select", "heldout", "--eval-every", "0"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "choose final, or heldout with --eval-every > 0" in proc.stderr
    short = tmp_path / "short"  # --steps below --eval-every: the last step is scored, so there is one to select
    proc = run_script([str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", str(root), "--model",
                       tiny_model, "--steps", "3", "--batch-size", "8", "--eval-every", "5", "--select", "heldout",
                       "--out", str(short)], cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert [("heldout_acc" in json.loads(x)) for x in (short / "log.jsonl").read_text().splitlines()] == [False, False, True]
    assert {json.loads(x)["selected_step"] for x in (short / "results.jsonl").read_text().splitlines()} == {3}


def test_threads_follow_the_free_cores_and_the_flag(tmp_path, folder_data, tiny_model, monkeypatch):
    """One busy process on the cores: fewer are counted free (and so fewer threads picked); --threads and
    $OMP_NUM_THREADS win; a method file prints what it chose."""
    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert common.free_cores(0.5) <= cores - 0.6
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert 1 <= common.set_threads(0) <= max(1, cores - 1)
    finally:
        busy.kill()
        busy.wait()
    assert common.set_threads(3) == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert common.set_threads(0) == 2
    torch.set_num_threads(before)
    out = run_script(["baselines.py", "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "1",
                      "--batch-size", "4", "--threads", "1", "--out", str(tmp_path / "run")], cwd=REPO).stdout
    assert "CPU threads: 1 (--threads)" in out
    assert json.loads((tmp_path / "run" / "args.json").read_text())["machine"]["threads"] == 1  # the count used, recorded
    (tmp_path / "run" / "final.pt").unlink()  # as if killed after its checkpoint: a resume keeps the run's count
    out = run_script(["baselines.py", "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "1",
                      "--batch-size", "4", "--out", str(tmp_path / "run"), "--resume"], cwd=REPO, env_extra={"OMP_NUM_THREADS": "2"}).stdout
    assert "CPU threads: 1 (the resumed run's own" in out


@pytest.mark.parametrize("script", ["baselines.py", "lipsum_ft.py", "car_ft.py", "arf.py", "carot.py"])
def test_every_method_file_offers_zeroshot_data_and_threads(script):
    out = run_script([script, "--help"], cwd=REPO).stdout
    assert "--zeroshot-data" in out and "--threads" in out and "--select" in out


# ------------------------------------------------------------------------ the house rule
METHOD_FILES = ("lipsum_ft.py", "car_ft.py", "arf.py", "carot.py", "baselines.py", "merge.py", "evaluate.py")


def public_names(path: Path) -> list:
    """The top-level functions, classes and constants a file defines, without a leading underscore."""
    import ast

    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def test_common_holds_only_what_the_method_files_share():
    """Every public name of common.py is used by common.py itself (the run and its loop) or by at least two
    of the files that import it; the layers below it (tasks/, towers/) are imported by common.py alone."""
    import re

    text = {f: (REPO / f).read_text() for f in ("common.py", *METHOD_FILES)}
    lonely = {}
    for name in public_names(REPO / "common.py"):
        word = re.compile(rf"\b{name}\b")
        inside = len(word.findall(text["common.py"])) > 1  # its definition is one mention
        users = [f for f in METHOD_FILES if word.search(text[f])]
        if not inside and len(users) < 2:
            lonely[name] = users
    assert not lonely, f"used by one file only (move it there): {lonely}"
    assert "from tasks" in text["common.py"] and "from towers" in text["common.py"]
    for f in METHOD_FILES:
        assert not re.search(r"^\s*(from|import) (tasks|towers|tracking|miniworld)\b", text[f], re.M), f"{f} imports a layer below common.py"


def test_the_rule_finds_a_name_only_one_file_uses(tmp_path, monkeypatch):
    """The house rule can fail: a helper that only arf.py calls is reported."""
    import shutil

    for f in ("common.py", *METHOD_FILES):
        shutil.copy(REPO / f, tmp_path / f)
    with open(tmp_path / "common.py", "a") as f:
        f.write("\n\ndef only_arf_needs_this():\n    return 1\n")
    with open(tmp_path / "arf.py", "a") as f:
        f.write("\nonly_arf_needs_this()\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError, match="only_arf_needs_this"):
        test_common_holds_only_what_the_method_files_share()


def test_shots_train_two_methods_of_a_seed_on_the_same_images_and_a_finished_run_rebuilds_them(tmp_path, folder_data,
                                                                                                 tiny_model):
    """--shots end to end: FT and LP of seed 0 draw one set of images, seed 1 another; args.json and the rows
    carry K, and load_run (evaluate.py, merge.py) rebuilds each run's own few-shot task."""
    runs = {}
    for method, seed in (("ft", 0), ("lp", 0), ("ft", 1)):
        out = tmp_path / f"{method}{seed}"
        proc = run_script([str(REPO / "baselines.py"), "--method", method, "--data", "folder", "--data-root", folder_data,
                           "--model", tiny_model, "--steps", "2", "--batch-size", "8", "--workers", "0", "--shots", "2",
                           "--seed", str(seed), "--out", str(out)], cwd=tmp_path)
        assert f"--shots 2: 8 training images (2 per class), drawn by seed {seed}" in proc.stdout
        assert json.loads((out / "args.json").read_text())["shots"] == 2
        assert {json.loads(r)["config"]["shots"] for r in (out / "results.jsonl").read_text().splitlines()} == {2}
        runs[method, seed] = common.load_run(out, "cpu").task
    drawn = {k: task.train.images.paths for k, task in runs.items()}
    assert len(drawn["ft", 0]) == 8 and drawn["ft", 0] == drawn["lp", 0]
    assert drawn["ft", 1] != drawn["ft", 0]
    assert drawn["ft", 0] == common.load_task("folder", folder_data, 0, shots=2).train.images.paths
    assert not set(drawn["ft", 1]) & set(runs["ft", 1].heldout.images.paths)


def test_resume_of_a_run_written_before_shots_and_source_domain_existed(tmp_path):
    """A field added later is read as its default from an older args.json: such a run resumes, and a
    resume asking for another value is refused, named."""
    args = common.make_args(common.TrainArgs, "folder", out=str(tmp_path / "old"), resume=True)
    (tmp_path / "old").mkdir()
    old = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("shots", "source_domain")}
    (tmp_path / "old" / "args.json").write_text(json.dumps({"method": "ft", **old}))
    assert common.check_run(args, "ft") == tmp_path / "old"
    with pytest.raises(SystemExit, match="--shots 0 -> 4"):
        common.check_run(dataclasses.replace(args, shots=4), "ft")


def test_default_run_folder_names_the_shots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert common.check_run(common.make_args(common.TrainArgs), "ft") == Path("runs/ft-miniworld-k10-miniclip-s0")  # its recipe's K
    assert common.check_run(common.make_args(common.TrainArgs, shots=4), "ft") == Path("runs/ft-miniworld-k4-miniclip-s0")
    assert common.check_run(common.make_args(common.TrainArgs, shots=0), "ft") == Path("runs/ft-miniworld-miniclip-s0")
    assert common.make_args(common.TrainArgs, "folder", data_root="x").shots == 0  # other --data: the full training set


def test_gzsl_metrics_are_per_class_accuracies_over_all_classes_and_their_harmonic_mean():
    """S and U: mean per-class top-1 accuracy (argmax over all classes) of the seen and the unseen classes
    present; H = 2SU / (S + U)."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    pred = torch.tensor([0, 0, 0, 2, 1, 0, 2, 0, 1, 3])  # class 0: 3/4, 1: 1/2, 2: 1/3, 3: 1/1
    logits = F.one_hot(pred, 5).float() * 3  # [10, 5]: a fifth class with no images
    m = common.gzsl_metrics(logits, labels, unseen=[2, 3, 4])
    s, u = (3 / 4 + 1 / 2) / 2, (1 / 3 + 1) / 2
    assert m["acc_seen"] == pytest.approx(s) and m["acc_unseen"] == pytest.approx(u)
    assert m["h"] == pytest.approx(2 * s * u / (s + u))
    no_seen = common.gzsl_metrics(logits, labels, unseen=[0, 1, 2, 3])  # no seen class has images here
    assert math.isnan(no_seen["acc_seen"]) and math.isnan(no_seen["h"]) and no_seen["acc_unseen"] == pytest.approx(0.6458333)
    nothing = common.gzsl_metrics(F.one_hot(torch.tensor([1, 0]), 4).float(), torch.tensor([0, 1]), unseen=[1])
    assert nothing == {"acc_seen": 0.0, "acc_unseen": 0.0, "h": 0.0}
