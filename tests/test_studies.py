"""studies/ (miniworld design probes) end to end on micro configs: variants render and train, the no-object-word
texts keep Lipsum-FT's layout, the concept probe grows the world and pretrains."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "studies"))
sys.path.insert(0, str(REPO / "reproduce"))


def test_world_probe_micro_renders_a_variant_and_trains_on_it(tmp_path, monkeypatch, capsys):
    import miniworld
    import world_probe

    monkeypatch.setattr(miniworld.task, "TASK_SIZES", dict(train=64, heldout=16, id=24, ood=12, zeroshot=12))
    monkeypatch.setattr(miniworld, "load_task", miniworld.load_task)  # the probe swaps it per variant; put it back after
    world_probe.main(["--variants", "pattern", "--runs", str(tmp_path / "runs"), "--threads", "1", "--methods",
                      "zeroshot,ft,lipsum_ft-noobj", "--train-images", "48", "--errors", "--diagnostics",
                      "--extra", "--steps 2 --batch-size 8 --eval-every 0 --ckpt-every 0"])
    out = capsys.readouterr().out
    assert "| ft | 1 |" in (tmp_path / "runs" / "pattern" / "diagnostics.md").read_text()  # loaded with its 20 classes
    assert "## pattern: 20 classes, e.g. ['solid red triangle'" in out
    assert "zeroshot" in out and "ft " in out and "the bulge" in out and "lipsum_ft-noobj" in out
    assert "only zero-shot right" in out and "zero-shot gets wrong: shape" in out and out.count("output ensemble, zero-shot weight") == len(world_probe.ENSEMBLE_WEIGHTS)
    assert (tmp_path / "runs" / "pattern" / "noobj" / "lipsum_ft-s0" / "final.pt").is_file()
    assert json.loads((tmp_path / "runs" / "pattern" / "ft-s0" / "args.json").read_text())["steps"] == 2
    task = world_probe.variant_task("pattern")
    train = task["splits"]["train"]
    assert len(train["labels"]) == 64 and train["images"].shape == (64, 32, 32, 3) and len(train["captions"]) == 64
    assert len(world_probe.variant_task("pattern", train_images=40)["splits"]["train"]["labels"]) == 40


def test_world_probe_noobj_texts_avoid_object_words_and_keep_lipsum_layout():
    import torch

    import lipsum_ft
    import miniworld
    import world_probe

    tokenizer = miniworld.WordTokenizer()
    banned = world_probe.object_word_ids(tokenizer)
    names = {tokenizer.vocab[i] for i in banned}
    assert {"diamond", "yellow", "striped", "stripes", "polka", "donut"} <= names  # names, synonyms, facts
    assert not names & (world_probe.OBJECT_STOPWORDS | {"grass", "photo", "sketch", "night"})  # filler and nuisances stay
    sot, eot, vocab_size = lipsum_ft.special_token_ids(tokenizer)
    args = (500, lipsum_ft.TEXT_LENGTH, sot, eot, vocab_size, tokenizer.context_length)
    texts = world_probe.without_object_words(banned)(*args, torch.Generator().manual_seed(0))  # [500, ctx]
    plain = lipsum_ft.random_texts(*args, torch.Generator().manual_seed(0))  # [500, ctx]
    assert texts.shape == plain.shape and (texts[:, 0] == sot).all() and (texts.argmax(1) == plain.argmax(1)).all()
    body = texts[:, 1:lipsum_ft.TEXT_LENGTH + 1]
    assert not torch.isin(body, torch.tensor(sorted(banned))).any() and (body > 0).all()
    assert torch.isin(plain[:, 1:lipsum_ft.TEXT_LENGTH + 1], torch.tensor(sorted(banned))).any()  # the plain ones do hit them


def test_world_probe_unknown_variant_or_method_is_one_message():
    import world_probe

    for argv, word in ((["--variants", "nope"], "--variants nope"), (["--methods", "ft,xx"], "--methods xx"),
                       (["--train-images", "-5"], "--train-images -5")):
        with pytest.raises(SystemExit, match=word):
            world_probe.main(argv)


@pytest.fixture
def restored_world(monkeypatch, tmp_path):
    """concept_probe.extend_world changes miniworld in place; put its shape list and facts back after."""
    import miniworld

    monkeypatch.setenv("ROBUSTFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(miniworld.world, "_shape_mask", miniworld.world._shape_mask)
    shapes, facts = list(miniworld.SHAPES), dict(miniworld.SHAPE_FACTS)
    yield miniworld
    miniworld.SHAPES[:] = shapes
    miniworld.SHAPE_FACTS.clear()
    miniworld.SHAPE_FACTS.update(facts)


def test_concept_probe_extra_shapes_render_distinct_and_are_captioned(restored_world):
    import numpy as np

    import concept_probe

    mw = restored_world
    key_before = mw._digest(mw.world_config())
    added = concept_probe.extend_world(len(concept_probe.EXTRA_SHAPES))
    assert mw.SHAPES[-len(added):] == added and mw._digest(mw.world_config()) != key_before  # new cache keys
    n = len(mw.SHAPES)
    masks = np.stack([mw.world._shape_mask(name, *np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64)))
                      for name in mw.SHAPES])  # [n, 64, 64]
    area = masks.mean((1, 2))
    assert (area > 0.08).all() and (area < 0.8).all(), dict(zip(mw.SHAPES, area.round(2)))
    differ = (masks[:, None] != masks[None]).mean((2, 3)) + np.eye(n)  # [n, n], pixels where two shapes differ
    assert differ.min() > 0.06, np.unravel_index(differ.argmin(), differ.shape)
    tok = mw.WordTokenizer()
    attrs = mw.sample_attrs(0, np.arange(200), shape=np.full(200, mw.SHAPES.index(added[0])))
    texts = mw.captions(attrs, 0, np.arange(200))
    assert any(added[0] in t for t in texts) and tok(texts).shape[0] == 200  # every word is in the grown vocabulary


def test_concept_probe_micro_pretrains_and_probes(restored_world, tmp_path, monkeypatch, capsys):
    import concept_probe
    import world_probe

    mw = restored_world
    monkeypatch.setattr(mw.task, "TASK_SIZES", dict(train=48, heldout=16, id=24, ood=12, zeroshot=12))
    monkeypatch.setattr(mw, "load_task", mw.load_task)
    monkeypatch.setattr(world_probe, "WISE_ALPHAS", "0.5,1")
    concept_probe.main(["--out", str(tmp_path / "probe"), "--extra-shapes", "3", "--pretrain-steps", "2",
                        "--pretrain-images", "64", "--threads", "1",
                        "--extra", "--steps 2 --batch-size 8 --eval-every 0 --ckpt-every 0"])
    out = capsys.readouterr().out
    assert "15 shapes (3 added)" in out and "pretrained in" in out and "only zero-shot right" in out
    assert "participation ratio" in (tmp_path / "probe" / "task" / "diagnostics.md").read_text()
    args = json.loads((tmp_path / "probe" / "task" / "lipsum_ft-s0" / "args.json").read_text())
    assert args["pretrained"] == str(tmp_path / "probe" / "miniclip.pt")
    for argv, word in ((["--extra-shapes", "99"], "--extra-shapes 99"), (["--pretrain-steps", "0"], "--pretrain-steps 0"),
                       (["--pretrain-images", "-1"], "--pretrain-images -1")):
        with pytest.raises(SystemExit, match=word):
            concept_probe.main(argv)
