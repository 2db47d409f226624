"""car_ft.py: the context KL against its closed form (and against Lipsum-FT's KL corner), the context
head, gradient routing, and the script end to end on generated folders with a tiny random CLIP."""
import pytest
import torch
import torch.nn.functional as F

import car_ft
import lipsum_ft
from conftest import assert_gradients_reach_only_image_tower_and_head, assert_script_trains_on_folders, randn


def test_regularizer_vanishes_at_theta0_and_kl_is_nonnegative():
    f, t = randn(7, 8, seed=4), randn(5, 8, seed=5)
    assert car_ft.car_regularizer(f, f.clone(), t, 20.0).item() == 0.0
    for seed in range(20):
        kl = car_ft.car_regularizer(randn(4, 8, seed=seed), randn(4, 8, seed=seed + 100), t, 20.0)
        assert kl.item() >= 0.0


def test_car_regularizer_is_teacher_first_kl_at_scale_s():
    f, f0, w, s = randn(6, 8, seed=6), randn(6, 8, seed=7), F.normalize(randn(4, 8, seed=8), dim=-1), 14.0
    p = torch.softmax(s * F.normalize(f, dim=-1) @ w.t(), -1)
    p0 = torch.softmax(s * F.normalize(f0, dim=-1) @ w.t(), -1)
    expected = (p0 * (p0.log() - p.log())).sum(-1).mean()  # KL(p0 ‖ p)
    assert car_ft.car_regularizer(f, f0, w, s).item() == pytest.approx(expected.item(), abs=1e-10)
    # CAR-FT is Lipsum-FT's (KLD, fixed texts) ablation corner: the two files must agree there
    assert lipsum_ft.lipsum_regularizer(f, f0, w, s, loss="kld").item() == pytest.approx(expected.item(), abs=1e-10)


def test_car_regularizer_stays_float32_under_bf16_autocast():
    f = randn(16, 32, seed=30)
    f0 = f + 1e-3 * randn(16, 32, seed=31)
    w = F.normalize(randn(14, 32, seed=32), dim=-1)
    want = car_ft.car_regularizer(f, f0, w, 20.0).item()  # float64: the reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = car_ft.car_regularizer(f.float(), f0.float(), w.float(), torch.tensor(20.0))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=2e-2)  # float32 round-off; bf16: 100x off


def test_loss_adds_the_weighted_regularizer_to_cross_entropy():
    logits, labels = randn(6, 3, seed=9), torch.tensor([0, 1, 2, 0, 1, 2])
    f, f0, t = randn(6, 8, seed=10), randn(6, 8, seed=11), randn(5, 8, seed=12)
    loss, terms = car_ft.car_ft_loss(logits, labels, f, f0, t, 20.0, beta=0.5)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item() + 0.5 * terms["kl"].item(), abs=1e-10)


def test_gradients_reach_only_image_tower_and_head(tiny_classifier):
    model = tiny_classifier
    w_ctx = car_ft.context_head(model.clip, model.tokenizer, ["cat", "dog"], ["a photo of a {}.", "a sketch of a {}."])
    assert_gradients_reach_only_image_tower_and_head(model, car_ft.make_loss_fn(model, w_ctx, 1.0))


def test_context_head_rows_are_class_means_of_template_prompts(tiny_classifier):
    clip, tok = tiny_classifier.clip, tiny_classifier.tokenizer
    classes, templates = ["cat", "dog", "owl"], ["a photo of a {}.", "a sketch of a {}."]
    w = car_ft.context_head(clip, tok, classes, templates)
    assert w.shape == (2, 32)
    with torch.no_grad():
        for c, tpl in enumerate(templates):
            e = clip.encode_text(tok([tpl.format(k) for k in classes]), normalize=True).mean(0)
            assert torch.allclose(w[c], e / e.norm(), atol=1e-6)


def test_script_trains_and_evaluates_on_folders(tiny_model, folder_data, tmp_path):
    assert_script_trains_on_folders("car_ft.py", "beta=1", tiny_model, folder_data, tmp_path)
