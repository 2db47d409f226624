"""Fast checks of the miniworld: renderer, captions, tokenizer, tiny CLIP, task and pool (< 60 s on 2 cores)."""
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import miniworld as mw  # noqa: E402

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": mw.CONTEXT_LENGTH, "vocab_size": mw.WordTokenizer().vocab_size,
                     "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFT_CACHE", str(tmp_path / "cache"))


def test_rendering_is_deterministic_and_seeded():
    a, _ = mw.render_batch(3, [0, 5, 9])
    b, _ = mw.render_batch(3, [0, 5, 9])
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    assert a.tobytes() == b.tobytes()
    # an image depends on (seed, index) only, not on the rest of the batch
    assert mw.render_batch(3, [5])[0][0].tobytes() == a[1].tobytes()
    c, _ = mw.render_batch(4, [0, 5, 9])
    assert all(c[i].tobytes() != a[i].tobytes() for i in range(3))


def test_every_style_renders_and_styles_differ():
    imgs = [mw.render_batch(0, np.arange(8), style=k, shape=3, colour=0)[0].astype(float) for k in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(imgs[i] - imgs[j]).mean() > 5, (mw.STYLES[i], mw.STYLES[j])


def test_captions_name_the_class_and_use_only_vocab_words():
    tok = mw.WordTokenizer()
    idx = np.arange(300)
    _, a = mw.render_batch(0, idx)
    caps = mw.captions(a, 0, idx)
    for i, c in enumerate(caps):
        assert f"{list(mw.COLOURS)[a['colour'][i]]} {mw.SHAPES[a['shape'][i]]}" in c, c
        assert len(tok.encode(c)) <= tok.context_length - 2
    assert mw.captions(a, 0, idx) == caps and mw.captions(a, 0, idx, epoch=1) != caps
    words = {w for c in caps for w in mw._split(c)}
    assert len(words) > 150 and tok.vocab_size > 300  # a rich caption language, not a few dozen words
    task_texts = [t.format(mw.class_name(*c)) for t in mw.TASK_TEMPLATES for c in mw.TASK_CLASSES]
    tok(task_texts + [t.format(p) for t in mw.SCENE_TEMPLATES for p in mw.SCENE_NAMES])  # must not raise
    for name in mw.SCENE_NAMES:  # each scene's name is one of its background's caption phrases
        assert name in mw.BG_PHRASES[mw.BACKGROUNDS[mw.SCENE_NAMES.index(name)]]


def test_tokenizer_layout_roundtrip_and_eot_argmax():
    tok = mw.WordTokenizer()
    assert tok.pad_token_id == 0 and tok.vocab[0] == "<pad>"
    assert (tok.sot_token_id, tok.eot_token_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    text = "A photo of the red star, on the grass."
    ids = tok([text, "a sketch of a blue ring."])
    assert ids.shape == (2, tok.context_length) and ids.dtype == torch.long
    assert tok.decode(ids[0]) == "a photo of the red star , on the grass ."
    assert (ids.argmax(-1) == (ids > 0).sum(-1) - 1).all()  # EOT is the last non-pad token and the max id
    assert ids[0, 0] == tok.sot_token_id
    long = tok(" ".join(["star"] * 100), context_length=10)
    assert long.shape == (1, 10) and long[0, -1] == tok.eot_token_id and long.argmax() == 9
    with pytest.raises(ValueError, match="not in the miniworld vocabulary"):
        tok("a photo of a zebra")


def test_micro_pretraining_lowers_the_contrastive_loss():
    torch.manual_seed(0)
    _, losses = mw.pretrain(steps=40, batch_size=32, lr=3e-3, n_images=32, cfg=TINY, progress=False)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


def test_checkpoint_round_trip(tmp_path):
    model, cfg = mw.create_miniclip(TINY)
    path = tmp_path / "tiny.pt"
    mw.save_miniclip(model.eval(), cfg, path)
    loaded, tok = mw.load_miniclip(path=path)
    assert not loaded.training
    x = mw.to_tensor(mw.render_batch(0, np.arange(4))[0])
    t = tok(["a photo of the red star.", "a cartoon of a blue ring."])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
        assert torch.equal(model.encode_text(t), loaded.encode_text(t))
    bad = torch.load(path, weights_only=False)
    bad["vocab"] = bad["vocab"][:-3] + ["zebra"] + bad["vocab"][-2:]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="vocabulary"):
        mw.load_miniclip(path=tmp_path / "bad.pt")


def test_committed_checkpoint_loads():
    if not mw.CHECKPOINT.exists():
        pytest.skip("assets/miniclip.pt not built yet")
    assert mw.CHECKPOINT.stat().st_size <= 25e6
    model, tok = mw.load_miniclip()
    with torch.no_grad():
        img = model.encode_image(mw.to_tensor(mw.render_batch(0, np.arange(2))[0]))
        txt = model.encode_text(tok(["a photo of the red star."]))
    assert img.shape == (2, txt.shape[1]) and torch.isfinite(img).all() and not model.training


def test_missing_checkpoint_says_how_to_build_it_and_never_pretrains(tmp_path, monkeypatch):
    monkeypatch.setattr(mw.model, "CHECKPOINT", tmp_path / "assets" / "miniclip.pt")
    monkeypatch.setattr(mw.model, "pretrain", lambda *a, **k: pytest.fail("load_miniclip must not pretrain"))
    t0 = time.time()
    with pytest.raises(SystemExit) as exc:
        mw.load_miniclip()
    msg = str(exc.value)
    assert "missing" in msg and "python -m miniworld pretrain" in msg and "miniclip.pt" in msg, msg
    with pytest.raises(SystemExit, match="no checkpoint at"):
        mw.load_miniclip(path=tmp_path / "nowhere.pt")
    assert time.time() - t0 < 5


def test_load_task_splits(monkeypatch):
    monkeypatch.setattr(mw.task, "TASK_SIZES", dict(train=60, heldout=20, id=20, ood=20, zeroshot=24))
    task = mw.load_task(0)
    K = len(task["classnames"])
    assert K == len(mw.TASK_CLASSES) == 24 and len(task["templates"]) >= 8
    assert task["classnames"][1] == "striped yellow diamond"
    kinds = {n: sp["kind"] for n, sp in task["splits"].items()}
    assert sorted(set(kinds.values())) == ["heldout", "id", "ood", "train", "zeroshot"]
    assert sum(k == "ood" for k in kinds.values()) >= 4
    for name, sp in task["splits"].items():
        n = len(sp["labels"])
        assert sp["images"].shape == (n, 32, 32, 3) and sp["images"].dtype == np.uint8
        assert sp["labels"].dtype == np.int64
        assert 0 <= sp["labels"].min() and sp["labels"].max() < len(sp.get("classnames", task["classnames"]))
    assert len(task["splits"]["train"]["captions"]) == 60
    zs = task["splits"]["zs_classes"]["classnames"]
    assert not set(zs) & set(task["classnames"])  # zero-shot classes never appear in fine-tuning
    again = mw.load_task(0)  # from the cache
    assert again["splits"]["id"]["images"].tobytes() == task["splits"]["id"]["images"].tobytes()
    assert again["splits"]["train"]["captions"] == task["splits"]["train"]["captions"]


def test_task_classes_are_fine_grained_and_the_fill_pattern_is_legible_in_every_style():
    # classes that share shape and colour differ in the fill pattern alone
    by_look = {}
    for s, c, p in mw.TASK_CLASSES:
        by_look.setdefault((s, c), set()).add(p)
    assert all(len(ps) == len(mw.TASK_PATTERNS) for ps in by_look.values())
    # the same objects drawn solid and striped differ inside the object in every style (sketch inks it in)
    idx = np.arange(16)
    for k, style in enumerate(mw.STYLES):
        fixed = dict(style=k, shape=mw.SHAPES.index("square"), colour=0, size=2, cx=0.0, cy=0.0, light=1)
        solid, _ = mw.render_batch(0, idx, pattern=0, **fixed)
        striped, _ = mw.render_batch(0, idx, pattern=1, **fixed)
        centre = (slice(None), slice(10, 22), slice(10, 22))
        diff = np.abs(solid[centre].astype(float) - striped[centre].astype(float)).mean()
        assert diff > 12, (style, diff)


def test_task_splits_carry_no_background_shortcut(monkeypatch):
    # backgrounds are drawn independently of the label: every class's mean corner colour (background pixels)
    # is the overall mean up to sampling noise (~12 levels at 40 images; a 90% home-background cue gives ~80)
    n = 24 * 40
    monkeypatch.setattr(mw.task, "TASK_SIZES", dict(train=n, heldout=24, id=n, ood=24, zeroshot=24))
    for name in ("train", "id"):
        split = mw.task._task_split(name, 0, 1000)
        corners = split["images"][:, :4, :4].reshape(len(split["labels"]), -1, 3).mean(1)  # [N, 3]
        per_class = np.stack([corners[split["labels"] == k].mean(0) for k in range(24)])  # [24, 3]
        assert np.abs(per_class - corners.mean(0)).max() < 40, (name, np.abs(per_class - corners.mean(0)).max())


def test_write_pool_is_complete_and_idempotent(tmp_path):
    tsv = mw.write_pool(tmp_path / "pool", n=25)
    rows = tsv.read_text().splitlines()
    assert rows[0] == "filepath\ttitle" and len(rows) == 26
    for row in rows[1:]:
        rel, title = row.split("\t")
        assert (tsv.parent / rel).is_file() and title
    mtime = os.stat(tsv).st_mtime_ns
    assert mw.write_pool(tmp_path / "pool", n=25) == tsv and os.stat(tsv).st_mtime_ns == mtime
