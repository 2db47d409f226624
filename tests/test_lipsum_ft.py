"""lipsum_ft.py: the regulariser against a hand loop and closed forms, the random texts of each step, the
model's own scale, gradient routing, bit-exact resume, the energy gap, and the script end to end on
generated folders with a tiny random CLIP."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import lipsum_ft
from conftest import (assert_gradients_reach_only_image_tower_and_head, assert_script_trains_on_folders, perturb_,
                      randn, write_hf_tokenizer)

OPENAI_SPECIALS = dict(sot=49406, eot=49407, vocab_size=49408)


# ------------------------------------------------------------------ the regulariser (no model)
def test_lipsum_regularizer_equals_hand_loop():
    f, f0, t, s = randn(5, 8, seed=1), randn(5, 8, seed=2), randn(13, 8, seed=3), 17.3
    total = 0.0
    for b in range(5):
        fb, f0b = f[b] / f[b].norm(), f0[b] / f0[b].norm()
        for m in range(13):
            tm = t[m] / t[m].norm()
            total += (s * float(fb @ tm) - s * float(f0b @ tm)) ** 2 / (2 * 13)
    assert lipsum_ft.lipsum_regularizer(f, f0, t, s).item() == pytest.approx(total / 5, abs=1e-6)


def test_regularizer_vanishes_at_theta0():
    f, t = randn(7, 8, seed=4), randn(5, 8, seed=5)
    assert lipsum_ft.lipsum_regularizer(f, f.clone(), t, 20.0).item() == 0.0
    assert lipsum_ft.lipsum_regularizer(f, f.clone(), t, 20.0, loss="kld").item() == 0.0


def test_regularizer_and_energies_stay_float32_under_bf16_autocast():
    """Near θ0 (features 1e-3 apart) R is ~1e-5 of the energies' scale: bf16 products would round it away
    (issue #27: 8.2e-5 read instead of 9.4e-6). Under CPU bf16 autocast R and v must be float32 and match
    a float64 computation."""
    f = randn(16, 32, seed=20)
    f0 = f + 1e-3 * randn(16, 32, seed=21)
    t, s = randn(80, 32, seed=22), torch.tensor(20.0)
    want = lipsum_ft.lipsum_regularizer(f, f0, t, float(s)).item()  # float64 inputs: the reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lipsum_ft.lipsum_regularizer(f.float(), f0.float(), t.float(), s)
        v = lipsum_ft.energies(f.float(), t.float(), s.bfloat16())
        kld = lipsum_ft.lipsum_regularizer(f.float(), f0.float(), t.float(), s, loss="kld")
    assert got.dtype == v.dtype == kld.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-4)
    assert torch.allclose(v.double(), lipsum_ft.energies(f, t, 20.0), atol=1e-4)
    assert lipsum_ft.lipsum_regularizer(f.float(), f.float(), t.float(), s).item() == 0.0  # θ0 against itself


def test_loss_adds_the_weighted_regularizer_to_cross_entropy():
    logits, labels = randn(6, 3, seed=9), torch.tensor([0, 1, 2, 0, 1, 2])
    f, f0, t = randn(6, 8, seed=10), randn(6, 8, seed=11), randn(5, 8, seed=12)
    loss, terms = lipsum_ft.lipsum_ft_loss(logits, labels, f, f0, t, 20.0, lam=3.0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item() + 3.0 * terms["reg"].item(), abs=1e-10)


# ------------------------------------------------------------------ random texts
def test_random_texts_layout_and_no_special_tokens_in_body():
    g = torch.Generator().manual_seed(0)
    tok = lipsum_ft.random_texts(500, 8, context_length=16, generator=g, **OPENAI_SPECIALS)
    assert tok.shape == (500, 16) and tok.dtype == torch.long
    assert (tok[:, 0] == 49406).all() and (tok[:, 9] == 49407).all() and (tok[:, 10:] == 0).all()
    body = tok[:, 1:9]
    assert ((body >= 1) & (body < 49406)).all()
    assert (tok.argmax(-1) == 9).all()  # open_clip pools the text at the argmax id: the EOT
    # a word-level vocabulary (miniworld: pad 0, SOT V-2, EOT V-1): every ordinary id, nothing else
    small = lipsum_ft.random_texts(400, 8, sot=10, eot=11, vocab_size=12, context_length=12, generator=g)
    assert set(small[:, 1:9].unique().tolist()) == set(range(1, 10))


def test_random_texts_change_every_step_and_repeat_for_the_same_step():
    def texts(seed, step):
        g = torch.Generator().manual_seed(lipsum_ft.text_seed(seed, step))
        return lipsum_ft.random_texts(80, 8, context_length=16, generator=g, **OPENAI_SPECIALS)

    assert torch.equal(texts(0, 5), texts(0, 5))
    assert not torch.equal(texts(0, 5), texts(0, 6))
    assert not torch.equal(texts(0, 5), texts(1, 5))


def test_random_texts_follow_a_hugging_face_tokenizers_layout(tiny_siglip, tmp_path):
    """SigLIP's tokenizer (HF, through open_clip's HFTokenizer): no start token, ids then its EOS, then
    [PAD] up to the context, where its tower pools (the last position); laid out as it lays out real text."""
    from open_clip.tokenizer import HFTokenizer

    clip, tok, _ = common.load_clip(tiny_siglip)
    hf = tok.tokenizer
    assert lipsum_ft.special_token_ids(tok) is None  # no SOT/EOT of open_clip's BPE
    texts = lipsum_ft.model_random_texts(clip, tok, 300, 8, torch.Generator().manual_seed(0))
    assert texts.shape == (300, 16) and texts.dtype == torch.long
    assert (texts[:, 8] == hf.eos_token_id).all() and (texts[:, 9:] == hf.pad_token_id).all()
    body = texts[:, :8]  # from position 0: there is no start token to skip
    assert set(body.unique().tolist()) == set(range(len(hf))) - set(hf.all_special_ids)  # every ordinary id, no other
    prefix, suffix, pad, _ = lipsum_ft.hf_text_layout(tok)
    for text in ["a photo of a cat.", "owl", "itap of the large red fox on the grass"]:  # real texts: the tokenizer's own rows
        ids = torch.tensor([hf(text, add_special_tokens=False)["input_ids"]])  # [1, L]
        assert torch.equal(lipsum_ft.laid_out_texts(ids, prefix, suffix, pad, 16), tok([text]))
    bert = HFTokenizer(str(write_hf_tokenizer(tmp_path / "bert", "[CLS] $A </s>")), context_length=12)  # a [CLS] first
    texts = lipsum_ft.model_random_texts(clip, bert, 50, 8, torch.Generator().manual_seed(0))
    assert (texts[:, 0] == 3).all() and (texts[:, 9] == 2).all() and (texts[:, 10:] == 0).all()
    assert not torch.isin(texts[:, 1:9], torch.tensor([0, 1, 2, 3])).any()
    with pytest.raises(SystemExit, match="exceed the text context"):
        lipsum_ft.model_random_texts(clip, HFTokenizer(hf.name_or_path, context_length=8), 3, 8, torch.Generator())
    with pytest.raises(SystemExit, match="cannot lay out random texts .*'clips'"):  # [CLS] after the padding: refused
        lipsum_ft.hf_text_layout(HFTokenizer(hf.name_or_path, context_length=16, tokenizer_mode="clips"))


# ------------------------------------------------------------------ with a tiny CLIP
def test_lipsum_loss_uses_model_scale_step_texts_and_theta0(tiny_classifier):
    model = tiny_classifier
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(20.0))
    loss_fn = lipsum_ft.make_loss_fn(model, lam=1.0, seed=3)
    kld_fn = lipsum_ft.make_loss_fn(model, lam=1.0, seed=3, reg_loss="kld")
    batch = {"image": randn(4, 3, 32, 32, seed=13).float(), "label": torch.tensor([0, 1, 2, 0])}
    assert loss_fn(model, batch, 0)[1]["reg"].item() < 1e-9  # θ = θ0 at the start
    f0 = model.image_features(batch["image"]).detach()  # θ0's features, before θ moves
    perturb_(model.clip.visual)
    reg = loss_fn(model, batch, 2)[1]["reg"].item()  # the texts of step 2
    g = torch.Generator().manual_seed(lipsum_ft.text_seed(3, 2))
    tokens = lipsum_ft.random_texts(lipsum_ft.NUM_TEXTS, lipsum_ft.TEXT_LENGTH, context_length=16, generator=g,
                                    **OPENAI_SPECIALS)
    with torch.no_grad():
        t = model.clip.encode_text(tokens, normalize=True)
        f = model.image_features(batch["image"])
    assert reg == pytest.approx(lipsum_ft.lipsum_regularizer(f, f0, t, 20.0).item(), rel=1e-5)
    assert reg > 1e-4  # and not the energies at a hard-coded s = 100 (25x larger)
    assert reg != pytest.approx(lipsum_ft.lipsum_regularizer(f, f0, t, 100.0).item(), rel=0.5)
    # --reg-loss kld reaches the loss: the same step's energies, compared by KL instead of MSE
    assert kld_fn(model, batch, 2)[1]["reg"].item() == pytest.approx(
        lipsum_ft.lipsum_regularizer(f, f0, t, 20.0, "kld").item(), rel=1e-5)


def test_lipsum_rejects_an_unknown_ablation_before_touching_the_run_folder(tmp_path, capsys):
    for flags in (["--reg-loss", "l1"], ["--text-guidance", "templates"]):
        with pytest.raises(SystemExit, match="choose mse or kld / random or fixed"):
            lipsum_ft.main([*flags, "--out", str(tmp_path / "run")])
        assert not (tmp_path / "run").exists()


def test_gradients_reach_only_image_tower_and_head(tiny_classifier):
    assert_gradients_reach_only_image_tower_and_head(tiny_classifier, lipsum_ft.make_loss_fn(tiny_classifier, 1.0, 0))


# ------------------------------------------------------------------ end to end
def test_script_trains_and_evaluates_on_folders(tiny_model, folder_data, tmp_path):
    assert_script_trains_on_folders("lipsum_ft.py", "lam=1", tiny_model, folder_data, tmp_path)
    lipsum_ft.main(["--report-energy-gap", str(tmp_path / "runs" / "r")])
    gap = json.loads((tmp_path / "runs" / "r" / "energy_gap.json").read_text())
    assert gap["num_texts"] == 10_000 and set(gap["splits"]) == {"test", "sketch"}
    assert gap["id"] > 0 and math.isfinite(gap["ood_mean"])


def test_script_trains_on_a_siglip_with_its_tokenizers_texts(tiny_siglip, folder_data, tmp_path, monkeypatch):
    assert_script_trains_on_folders("lipsum_ft.py", "lam=1", tiny_siglip, folder_data, tmp_path)
    monkeypatch.setattr(lipsum_ft, "ENERGY_GAP_TEXTS", 500)
    gap = lipsum_ft.main(["--report-energy-gap", str(tmp_path / "runs" / "r")])
    assert gap["id"] > 0 and math.isfinite(gap["ood_mean"])


def test_energy_gap_is_zero_for_the_zero_shot_model(tiny_model, folder_data, tmp_path, monkeypatch):
    monkeypatch.setattr(lipsum_ft, "ENERGY_GAP_TEXTS", 500)
    out = str(tmp_path / "zs")
    import baselines

    baselines.main(["--method", "zeroshot", "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
                    "--out", out])  # the untrained model (a method file refuses --steps 0)
    gap = lipsum_ft.main(["--report-energy-gap", out])
    assert gap["id"] < 1e-9 and gap["ood_mean"] < 1e-9


def test_resume_is_bit_identical(tiny_model, folder_data, tmp_path, monkeypatch):
    common_args = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4",
                   "--batch-size", "8", "--ckpt-every", "2", "--eval-every", "0", "--lam", "50"]
    lipsum_ft.main(common_args + ["--out", str(tmp_path / "full")])

    def interrupted(env, loss_fn, args, **kw):
        def killed(model, batch, step):
            if step == 3:  # killed after 3 steps, before a step-4 checkpoint: resume from step 2
                raise KeyboardInterrupt
            return loss_fn(model, batch, step)
        return common.train(env, killed, args, **kw)

    monkeypatch.setattr(lipsum_ft, "train", interrupted)
    with pytest.raises(SystemExit, match="interrupted. Last checkpoint: .*step_2.pt"):  # Ctrl-C's message
        lipsum_ft.main(common_args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(lipsum_ft, "train", common.train)
    lipsum_ft.main(common_args + ["--out", str(tmp_path / "cut"), "--resume"])
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generalized_zero_shot_keeps_the_zero_shot_head_over_all_classes(tiny_model, folder_data, tmp_path):
    """Lipsum-FT's Table 11 setup (--unseen-classes): the image tower trains with the regulariser on, the
    head over all 4 classes stays bitwise θ0's zero-shot head, and every test row carries S, U and H."""
    from conftest import run_script

    (tmp_path / "unseen.txt").write_text("red_fox\n")
    run_script(["lipsum_ft.py", "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "3",
                "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--unseen-classes", str(tmp_path / "unseen.txt"),
                "--out", str(tmp_path / "runs" / "r")], cwd=common.REPO)
    run = common.load_run(tmp_path / "runs" / "r", "cpu")
    final, theta0 = run.model.state_dict(), common.run_theta0(run, "cpu").state_dict()
    assert run.task.unseen == [3] and torch.equal(final["head"], theta0["head"])
    assert not torch.equal(final["clip.visual.conv1.weight"], theta0["clip.visual.conv1.weight"])
    log = [json.loads(x) for x in (tmp_path / "runs" / "r" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["reg"] > 0  # the regulariser is on: θ moved away from θ0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "r" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["h"] <= 1 and {"acc_seen", "acc_unseen"} <= set(r) for r in rows)
