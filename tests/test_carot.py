"""carot.py: the orthogonality and cross-projection norms and the self-distillation KL against closed
forms and hand computations, the loss against FLYP's at λ = 0, the teacher's momentum schedule, the
projection it constrains, kill-and-resume with the EMA teacher, the script end to end on folders, and
1 process = --grad-accum 2 = torchrun x2."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import baselines
import carot
import common
from conftest import REPO, assert_script_trains_on_folders, kill_at_step, randn, run_script


def test_orthogonality_is_zero_at_an_orthogonal_projection_and_its_closed_form_otherwise():
    q, _ = torch.linalg.qr(randn(8, 5, seed=1))  # [8, 5], orthonormal columns
    assert carot.orthogonality(q).item() == pytest.approx(0.0, abs=1e-7)
    assert carot.orthogonality(2 * q).item() == pytest.approx(45 ** 0.5, abs=1e-10)  # WᵀW − I = 3 I_5: ‖·‖_F = √(9·5)
    assert carot.orthogonality(q.t()).item() == pytest.approx(3 ** 0.5, abs=1e-10)  # width 5 < D 8: rank 5, √(8 − 5)
    w = randn(8, 5, seed=2)
    assert carot.orthogonality(w).item() == pytest.approx(((w.t() @ w - torch.eye(5)) ** 2).sum().sqrt().item(), abs=1e-9)
    v, t = randn(8, 5, seed=3), randn(6, 5, seed=4)
    assert carot.cross_norm(v, t).item() == pytest.approx(((v @ t.t()) ** 2).sum().sqrt().item(), abs=1e-9)
    assert carot.cross_norm(v, torch.zeros(6, 5, dtype=torch.float64)).item() == 0.0


def test_self_distillation_is_the_teacher_first_kl_summed_over_both_directions():
    img, txt = F.normalize(randn(6, 8, seed=3), dim=-1), F.normalize(randn(6, 8, seed=4), dim=-1)
    img_t, txt_t = F.normalize(randn(6, 8, seed=5), dim=-1), F.normalize(randn(6, 8, seed=6), dim=-1)
    s, s_t = 14.0, 9.0
    p, q = torch.softmax(s * img @ txt.t(), 1), torch.softmax(s_t * img_t @ txt_t.t(), 1)  # image→text rows
    pc, qc = torch.softmax(s * txt @ img.t(), 1), torch.softmax(s_t * txt_t @ img_t.t(), 1)  # text→image rows
    hand = (q * (q.log() - p.log())).sum(1).mean() + (qc * (qc.log() - pc.log())).sum(1).mean()
    got = carot.self_distillation(img, txt, img_t, txt_t, s, s_t)
    assert got.item() == pytest.approx(hand.item(), abs=1e-6) and got.item() > 0
    # the official soft-label CE, −Σ q log p over both directions, differs by the teacher's entropy only
    ce = -(q * p.log()).sum(1).mean() - (qc * pc.log()).sum(1).mean()
    entropy = -(q * q.log()).sum(1).mean() - (qc * qc.log()).sum(1).mean()
    assert got.item() == pytest.approx((ce - entropy).item(), abs=1e-6)
    assert carot.self_distillation(img, txt, img, txt, s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_flyp_plus_the_weighted_terms():
    rows = {"image": F.normalize(randn(6, 8, seed=7), dim=-1), "text": F.normalize(randn(6, 8, seed=8), dim=-1),
            "image_t": F.normalize(randn(6, 8, seed=9), dim=-1), "text_t": F.normalize(randn(6, 8, seed=10), dim=-1),
            "label": torch.tensor([0, 1, 2, 0, 1, 3])}
    scale, w, wt = torch.tensor(12.0, dtype=torch.float64), randn(10, 8, seed=11), randn(7, 8, seed=12)
    flyp, _ = baselines.flyp_loss(rows["image"], rows["text"], rows["label"], scale)
    zero, _ = carot.carot_loss(rows, scale, 7.0, w, wt, 0.0, 0.0, 0.0)
    assert zero.item() == pytest.approx(flyp.item(), abs=1e-6)  # λ = 0: FLYP's loss, same-class prompts masked
    loss, terms = carot.carot_loss(rows, scale, 7.0, w, wt, 0.2, 1.5, 0.05)
    sd = carot.self_distillation(rows["image"], rows["text"], rows["image_t"], rows["text_t"], scale, 7.0)
    oc, cross = carot.orthogonality(w).item(), carot.cross_norm(w, wt).item()
    assert loss.item() == pytest.approx(flyp.item() + 0.2 * oc + 1.5 * sd.item() + 0.05 * cross, abs=1e-6)
    assert (terms["oc"].item(), terms["sd"].item(), terms["cross"].item()) == pytest.approx((oc, sd.item(), cross))


def test_teacher_momentum_follows_the_official_schedule():
    args = common.make_args(carot.Args, "imagenet", carot.PRESETS)  # 25k steps: every 500, 0.05 → 0.9 over 5k steps
    assert (args.steps, args.lam_oc, args.lam_sd, args.lam_cross) == (25_000, 0.2, 1.5, 0.05)
    m = [carot.teacher_momentum(t, args) for t in range(25_000)]
    assert [t for t in range(25_000) if m[t] != 1.0] == list(range(0, 25_000, 500))
    assert m[0] == pytest.approx(0.05) and m[500] == pytest.approx(0.05 + 0.85 * 0.1) and m[4500] == pytest.approx(0.05 + 0.85 * 0.9)
    assert m[5000] == m[24_500] == 0.9
    short = common.make_args(carot.Args, "miniworld", carot.PRESETS)  # 300 steps: every 6
    assert [t for t in range(300) if carot.teacher_momentum(t, short) != 1.0] == list(range(0, 300, 6))


def test_visual_projection_is_the_trained_parameter_or_a_message(tiny_classifier):
    visual = tiny_classifier.clip.visual
    assert carot.visual_projection(visual) is visual.proj
    timm_like = torch.nn.Module()
    timm_like.head = torch.nn.Module()
    timm_like.head.proj = torch.nn.Linear(6, 4)
    assert torch.equal(carot.visual_projection(timm_like), timm_like.head.proj.weight.t())  # [width 6, D 4]
    with pytest.raises(SystemExit, match="error: CaRot constrains"):
        carot.visual_projection(torch.nn.Linear(3, 3))


def test_on_siglip_the_text_projection_is_a_linear_and_the_run_trains(tmp_path, folder_data, tiny_siglip):
    clip, _, _ = common.load_clip(tiny_siglip)
    assert torch.equal(carot.text_projection(clip), clip.text.text_projection.weight.t())  # [width_t, D]
    run_script([str(REPO / "carot.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_siglip, "--steps", "2",
                "--batch-size", "8", "--out", "runs/r"], cwd=tmp_path)
    log = [json.loads(x) for x in (tmp_path / "runs" / "r" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["cross"] > 0 and math.isfinite(r["loss"]) for r in log)
    with pytest.raises(SystemExit, match="--lam-cross 0"):
        carot.text_projection(torch.nn.Module())


def test_resume_continues_the_teacher(tmp_path, tiny_model, folder_data, monkeypatch):
    """Killed after step 3 and resumed from the step-2 checkpoint == uninterrupted: the EMA teacher must
    come back from the checkpoint (a teacher restarted at θ0 gives other weights at m = 0.5)."""
    base = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4", "--batch-size", "8",
            "--eval-every", "0", "--ckpt-every", "2", "--ema-momentum", "0.5", "--lam-sd", "10", "--lr", "1e-3"]  # ψ updated every step
    carot.main(base + ["--out", str(tmp_path / "straight")])
    real_train = kill_at_step(carot, monkeypatch, 3)  # 3 steps done, the newest checkpoint is step 2's
    with pytest.raises(SystemExit, match="interrupted. Last checkpoint: .*step_2.pt"):
        carot.main(base + ["--out", str(tmp_path / "resumed")])
    assert torch.load(tmp_path / "resumed" / "ckpt" / "step_2.pt", weights_only=False)["ema"] is not None  # ψ saved
    monkeypatch.setattr(carot, "train", real_train)
    carot.main(base + ["--out", str(tmp_path / "resumed"), "--resume"])
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_script_trains_and_evaluates_on_folders(tiny_model, folder_data, tmp_path):
    assert_script_trains_on_folders("carot.py", "oc=0.2,sd=1.5", tiny_model, folder_data, tmp_path)


# 1 process = --grad-accum 2 = torchrun ×2: carot is in conftest.METHODS, the matrix of tests/test_scale.py
# (the ViT) and tests/test_families.py (ResNet, ConvNeXt, SigLIP)
