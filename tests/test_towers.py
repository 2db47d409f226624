"""towers: the model families in training (frozen parts and BatchNorm in eval mode, keyed dropout and
drop_path masks). End to end, every family and method: tests/test_families.py."""
import pytest
import torch

import common
import towers


def test_keyed_masks_are_a_function_of_the_sample_not_its_batch():
    """KeyedDrop: a sample draws the same mask alone and among others (any order), the drop rate is p,
    a new step draws new masks, and evaluation is the identity."""
    noise = towers.KeyedNoise(seed=3)
    path, elem = towers.KeyedDrop(noise, "image", 0, 0.25, per_sample=True), towers.KeyedDrop(noise, "image", 1, 0.5, False)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))  # [B, E]: the inputs that key the samples

    def run(layer, rows):
        noise.keys["image"] = towers.sample_keys(x[rows])
        return layer(torch.ones(len(rows), 5))

    for layer in (path, elem):
        together = run(layer, list(range(64)))
        assert torch.equal(run(layer, [7]), together[7:8]) and torch.equal(run(layer, [9, 3]), together[[9, 3]])
        assert torch.allclose(together.unique(), torch.tensor([0.0, 1 / (1 - layer.p)]))
    assert (run(path, list(range(64)))[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.12)
    assert (run(elem, list(range(64))) == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (run(path, list(range(64))) == run(path, list(range(64)))[:, :1]).all()  # per sample: whole rows
    before = run(elem, list(range(64)))
    noise.step = 1
    assert not torch.equal(before, run(elem, list(range(64))))
    elem.eval()
    assert torch.equal(run(elem, [0, 1]), torch.ones(2, 5))


def test_train_mode_keeps_frozen_parts_and_batchnorm_in_eval_mode(tiny_classifier):
    model = tiny_classifier
    model.clip.visual.add_module("bn", torch.nn.BatchNorm1d(4))  # a BatchNorm in the trained tower
    model.clip.visual.add_module("drop", torch.nn.Dropout(0.1))  # no parameters, in the trained tower
    towers.train_mode(model)
    assert model.training and model.clip.visual.training and model.clip.visual.drop.training
    assert not model.clip.visual.bn.training  # BatchNorm: θ0's statistics, never updated
    assert not model.clip.transformer.training and not model.clip.token_embedding.training  # FT's frozen text tower
    common.set_trainable(model, image=False, head=True)  # LP
    towers.train_mode(model)
    assert not model.clip.visual.training and not model.clip.visual.drop.training
