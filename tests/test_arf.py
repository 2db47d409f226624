"""ARF: the contrastive loss against a hand loop, retrieval with known answers, the embedding and
caption caches, the BLIP-2 plumbing (a tiny random BLIP-2 built offline), pool rows that must be
skipped, and an end-to-end run on generated folder data."""
import json
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import arf
import common
from common import FileImages, load_classifier, zeroshot_head
from conftest import REPO, kill_at_step, make_pool, run_script, write_images

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def test_arf_loss_weights_and_switches():
    g = torch.Generator().manual_seed(1)
    e = lambda n: F.normalize(torch.randn(n, 6, generator=g), dim=-1)  # noqa: E731
    img, cls, cap, rimg, rtxt, labels = e(5), e(5), e(5), e(3), e(3), torch.tensor([0, 1, 0, 2, 1])
    loss, terms = arf.arf_loss(img, cls, labels, 5.0, cap, None, rimg, rtxt, None)
    assert set(terms) == {"l_ft", "l_cap", "l_ret"}
    want = (arf.W_FT * common.clip_contrastive_loss(img, cls, 5.0, labels) + arf.W_CAP * common.clip_contrastive_loss(img, cap, 5.0)
            + arf.W_RET * common.clip_contrastive_loss(rimg, rtxt, 5.0))
    assert abs(loss.item() - want.item()) < 1e-6
    only_ft, terms = arf.arf_loss(img, cls, labels, 5.0)
    assert set(terms) == {"l_ft"} and abs(only_ft.item() - terms["l_ft"].item()) < 1e-6


def tiny_blip2(folder: Path) -> str:
    """A randomly initialised BLIP-2 (ViT + Q-Former + OPT, a few thousand parameters) and its
    processor, saved like a hub checkpoint; built offline from a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              OPTConfig, PreTrainedTokenizerFast)

    words = ["<pad>", "</s>", "<unk>"] + "a photo of red green blue cat dog owl fox on the grass".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tok, num_query_tokens=4)
    image_token = tok.convert_tokens_to_ids("<image>")  # the processor added it
    text = OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            encoder_hidden_size=16, vocab_size=len(tok)),
        text_config=text.to_dict(), num_query_tokens=4, image_token_index=image_token)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> str:
    return tiny_blip2(tmp_path_factory.mktemp("blip2"))


def test_blip2_captions_batching_and_cache(tmp_path, blip2_dir, monkeypatch):
    from transformers import Blip2ForConditionalGeneration

    write_images(tmp_path / "imgs", 10, seed=9)
    images = FileImages(sorted(str(p) for p in (tmp_path / "imgs").iterdir()), [0] * 10)
    calls, generate = [], Blip2ForConditionalGeneration.generate

    def counting(self, pixel_values, **kw):
        calls.append(len(pixel_values))
        return generate(self, pixel_values=pixel_values, **kw)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "generate", counting)
    cache = tmp_path / "captions.tsv"
    caps = arf.blip2_captions(images, blip2_dir, cache, 4, torch.device("cpu"))
    assert calls == [4, 4, 2] and len(caps) == 10 and all(isinstance(c, str) and "\t" not in c for c in caps)
    lines = cache.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == images.paths  # keyed by image path

    calls.clear()
    assert arf.blip2_captions(images, blip2_dir, cache, 4, torch.device("cpu")) == caps and calls == []  # all cached
    cache.write_text("\n".join(lines[:7]) + "\n" + lines[7][:5])  # as if killed mid-write after 7 captions
    assert arf.blip2_captions(images, blip2_dir, cache, 4, torch.device("cpu")) == caps and calls == [3]


def test_dataset_captions_file(tmp_path):
    write_images(tmp_path / "data" / "train" / "cat", 3, seed=1)
    images = FileImages(sorted(str(p) for p in (tmp_path / "data" / "train" / "cat").iterdir()), [0] * 3)
    (tmp_path / "data" / "caps.tsv").write_text("".join(f"train/cat/{Path(p).name}\tcat number {i}\n" for i, p in enumerate(images.paths)))
    args = Namespace(captioner="dataset", captions=str(tmp_path / "data" / "caps.tsv"), data="folder")
    env = Namespace(task=Namespace(train=Namespace(images=images)))
    assert arf.train_captions(args, env) == ["cat number 0", "cat number 1", "cat number 2"]
    (tmp_path / "data" / "caps.tsv").write_text(f"train/cat/{Path(images.paths[0]).name}\tonly one\n")
    with pytest.raises(SystemExit, match="no caption for 2 of 3"):
        arf.train_captions(args, env)
    (tmp_path / "lists").mkdir()  # paths written relative to the captions file with '../' and './' match too
    (tmp_path / "lists" / "caps.tsv").write_text("".join(f"../data/./train/cat/{Path(p).name}\tcat {i}\n"
                                                         for i, p in enumerate(images.paths)))
    args.captions = str(tmp_path / "lists" / "caps.tsv")
    assert arf.train_captions(args, env) == ["cat 0", "cat 1", "cat 2"]


def test_anchor_inputs_that_cannot_work_stop_with_one_message(tmp_path, folder_data, tiny_model):
    """A missing --captions or --pool file, and --captions where the captioner is BLIP-2 (it would be
    ignored), each stop before anything slow with one message."""
    base = [str(REPO / "arf.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--out", "r"]
    for extra, message in ((["--captioner", "dataset", "--captions", "gone.tsv"], "--captions gone.tsv: no such file"),
                           (["--captioner", "dataset", "--captions", __file__, "--pool", "gone.tsv"], "--pool gone.tsv: no such file"),
                           (["--captions", __file__], "is read by --captioner dataset")):
        proc = run_script([*base, *extra], cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert not (tmp_path / "r").exists()


def test_end_to_end_blip2_pool_and_rerun(tmp_path, tiny_model, folder_data, blip2_dir, capsys):
    pool = make_pool(tmp_path / "pool", sorted((Path(folder_data) / "train" / "cat").iterdir())[:3])
    base = [sys.executable, str(REPO / "arf.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
            "--steps", "3", "--batch-size", "8", "--eval-every", "0", "--ckpt-every", "0", "--captioner", "blip2",
            "--captioner-model", blip2_dir, "--caption-batch-size", "16", "--pool", str(pool), "--retrieve-k", "2",
            "--cache", str(tmp_path / "cache")]
    first = subprocess.run(base + ["--out", "runs/a"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "captioning 44 images" in first.stdout and "skipped 4 rows" in first.stdout and "1 unreadable" in first.stdout
    assert "faiss index: Flat (exact) over 33 pool images" in first.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs" / "a" / "results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"test", "sketch"} and {r["method"] for r in rows} == {"arf"}
    model, _, _ = load_classifier(str(tmp_path / "runs" / "a"))
    from common import load_task

    task = load_task("folder", folder_data)
    head = zeroshot_head(model.clip, model.tokenizer, task.classnames, task.templates)  # from the fine-tuned tower
    assert torch.allclose(model.head, head, atol=1e-5)
    log = [json.loads(line) for line in (tmp_path / "runs" / "a" / "log.jsonl").read_text().splitlines()]
    assert {"l_ft", "l_cap", "l_ret"} <= set(log[0])

    capsys.readouterr()
    arf.main(base[2:] + ["--out", str(tmp_path / "runs" / "b"), "--no-cap"])  # in-process: main(argv) works too
    out = capsys.readouterr()
    assert "captioning" not in out.out and "embedding" not in out.err + out.out  # captions and embeddings cached
    assert "retrieved" in out.out
    rows = [json.loads(line) for line in (tmp_path / "runs" / "b" / "results.jsonl").read_text().splitlines()]
    assert {r["tag"] for r in rows} == {"no-cap"}


def test_resume_continues_the_anchor_stream(tmp_path, tiny_model, folder_data, monkeypatch):
    """Killed after step 3 and resumed from the step-2 checkpoint == uninterrupted, which needs the
    retrieved-pair stream to restart where it was (a function of the step, like the training batch)."""
    root = Path(folder_data)
    (root / "caps.tsv").write_text("".join(f"{p.relative_to(root)}\ta {p.parent.name} number {p.stem}\n"
                                           for p in sorted((root / "train").glob("*/*.jpg"))))
    pool = make_pool(tmp_path / "pool", sorted((root / "train" / "owl").iterdir())[:3])
    base = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4", "--batch-size", "8",
            "--ret-batch-size", "4", "--eval-every", "0", "--ckpt-every", "2", "--captioner", "dataset", "--captions",
            str(root / "caps.tsv"), "--pool", str(pool), "--retrieve-k", "2", "--cache", str(tmp_path / "cache")]
    arf.main(base + ["--out", str(tmp_path / "straight")])
    real_train = kill_at_step(arf, monkeypatch, 3)  # 3 steps done, the newest checkpoint is step 2's
    with pytest.raises(SystemExit, match="interrupted. Last checkpoint: .*step_2.pt"):  # Ctrl-C's message
        arf.main(base + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(arf, "train", real_train)
    arf.main(base + ["--out", str(tmp_path / "resumed"), "--resume"])
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


PREPARE = """
import json, sys
sys.path.insert(0, sys.argv[2])
import arf
arf.EMBED_CHUNK = arf.CAPTION_CHUNK = 8  # several chunks on a tiny dataset
arf.main(json.loads(sys.argv[1]))
"""


def prepare_argv(folder_data, tiny_model, blip2_dir, pool, cache):
    return ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--captioner", "blip2",
            "--captioner-model", blip2_dir, "--caption-batch-size", "4", "--pool", str(pool), "--retrieve-k", "2",
            "--eval-batch-size", "4", "--workers", "0", "--cache", str(cache), "--prepare"]


def test_prepare_on_two_processes_writes_the_caches_of_one(tmp_path, tiny_model, folder_data, blip2_dir):
    pool = make_pool(tmp_path / "pool", sorted((Path(folder_data) / "train" / "cat").iterdir())[:3])
    (tmp_path / "prepare.py").write_text(PREPARE)
    caches = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                   "--master_port", "29551"])):
        argv = prepare_argv(folder_data, tiny_model, blip2_dir, pool, tmp_path / name)
        out = run_script([*launcher, str(tmp_path / "prepare.py"), json.dumps(argv), str(REPO)], cwd=tmp_path,
                         env_extra={"OMP_NUM_THREADS": "1"}).stdout
        caches[name] = {p.name: p for p in (tmp_path / name).iterdir()}
        # 44 training images in chunks of 8: one process captions all; two take chunks 0, 2, 4 and 1, 3, 5
        shares = sorted(int(n) for n in re.findall(r"captioning (\d+) images", out))  # two processes' lines may interleave
        assert shares == ([44] if name == "one" else [20, 24]), out[-2000:]
    assert set(caches["one"]) == set(caches["two"]) and not [n for n in caches["one"] if "chunk" in n or "tmp" in n]
    for name, path in caches["one"].items():
        other = caches["two"][name]
        if name.endswith(".tsv"):  # captions: the same line per image, in whatever order the processes wrote
            assert sorted(path.read_text().splitlines()) == sorted(other.read_text().splitlines()), name
            assert len(path.read_text().splitlines()) == 44  # every training image (48 minus 4 held out)
        else:  # pool / training-image embeddings, their masks, the retrieved rows
            assert np.array_equal(np.load(path), np.load(other)), name
    assert any(n.startswith("retrieved-") for n in caches["one"])


def test_prepare_killed_midway_resumes_at_the_first_unfinished_chunk(tmp_path, tiny_model, folder_data, blip2_dir,
                                                                     monkeypatch):
    from transformers import Blip2ForConditionalGeneration

    pool = make_pool(tmp_path / "pool", sorted((Path(folder_data) / "train" / "cat").iterdir())[:3])
    monkeypatch.setattr(arf, "EMBED_CHUNK", 8)
    argv = prepare_argv(folder_data, tiny_model, blip2_dir, pool, tmp_path / "cache")
    generate, calls = Blip2ForConditionalGeneration.generate, []

    def killed_after_5_batches(self, pixel_values, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(len(pixel_values))
        return generate(self, pixel_values=pixel_values, **kw)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "generate", killed_after_5_batches)
    with pytest.raises(KeyboardInterrupt):
        arf.main(argv)
    assert calls == [4] * 5
    calls.clear()
    real_savez, saved = np.savez, []

    def savez_killed_at_the_third_chunk(file, **arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(Path(file).name)
        return real_savez(file, **arrays)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "generate", lambda self, pixel_values, **kw: (
        calls.append(len(pixel_values)) or generate(self, pixel_values=pixel_values, **kw)))
    monkeypatch.setattr(np, "savez", savez_killed_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        arf.main(argv)
    assert calls == [4] * 6  # the 44 - 5 x 4 = 24 captions still missing; the first 20 were not redone
    pool_chunks = sorted((tmp_path / "cache").glob("pool-*.chunk*.npz"))
    assert [p.name.split(".")[-2] for p in pool_chunks] == ["chunk000000", "chunk000001"]  # 35 pool images: 2 of 5 done
    calls.clear()
    saved.clear()
    monkeypatch.setattr(np, "savez", lambda file, **arrays: saved.append(Path(file).name) or real_savez(file, **arrays))
    arf.main(argv)
    assert calls == []  # every caption cached
    chunks = [n.split(".")[-3] for n in saved if n.startswith("pool-")]
    assert chunks == ["chunk000002", "chunk000003", "chunk000004"]  # the finished chunks were not recomputed
    assert not list((tmp_path / "cache").glob("*chunk*"))  # joined into the caches, then removed


def test_a_start_that_fails_leaves_no_run_behind(tmp_path, tiny_model, folder_data):
    root = Path(folder_data)
    (root / "caps.tsv").write_text("".join(f"{p.relative_to(root)}\ta {p.parent.name}\n" for p in sorted((root / "train").glob("*/*.jpg"))))
    argv = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "2", "--batch-size", "8",
            "--eval-every", "0", "--captioner", "dataset", "--captions", str(root / "caps.tsv"), "--retrieve-k", "2",
            "--cache", str(tmp_path / "cache"), "--workers", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="--ret needs --pool"):
        arf.main(argv)
    assert not (tmp_path / "run").exists()  # so the corrected rerun is not refused as "already holds a run"
    pool = make_pool(tmp_path / "pool", sorted((root / "train" / "owl").iterdir())[:3])
    assert {r["split"] for r in arf.main(argv + ["--pool", str(pool)])} == {"test", "sketch"}


@pytest.mark.parametrize("offline", ["1", "0"])
def test_an_unreachable_captioner_stops_at_once_with_what_to_pass(tmp_path, folder_data, tiny_model, offline):
    start = time.time()
    proc = run_script([str(REPO / "arf.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
                       "--captioner", "blip2", "--captioner-model", "Salesforce/blip2-opt-2.7b", "--out", "r"],
                      cwd=tmp_path, env_extra={"HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path / "hf")}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out and time.time() - start < 60, out[-2000:]
    assert "is not a local folder, not in the Hugging Face cache" in out and "--captions FILE" in out and "--no-cap" in out
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------ retrieval pools and faiss
def test_search_returns_the_known_neighbours(monkeypatch, capsys):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    pool = centres[rng.integers(0, 40, 5000)] + 0.3 * rng.normal(size=(5000, 16))  # clustered, like embeddings
    pool = (pool / np.linalg.norm(pool, axis=1, keepdims=True)).astype(np.float32)
    picked = rng.choice(5000, 200, replace=False)
    queries = pool[picked] + 0.01 * rng.normal(size=(200, 16)).astype(np.float32)
    top = arf.search(arf.build_index(pool), queries, 3)
    assert "Flat (exact)" in capsys.readouterr().out
    assert (top[:, 0] == picked).all()
    exact = np.argsort(-(queries @ pool.T), axis=1)[:, :3]
    assert (top == exact).all()
    monkeypatch.setattr(arf, "EXACT_MAX", 1000)  # the approximate path a >1M pool takes
    top = arf.search(arf.build_index(pool), queries, 3)
    assert "IVF256,Flat" in capsys.readouterr().out
    assert (top[:, 0] == picked).mean() >= 0.97


def test_pool_bad_rows_retrieval_and_embedding_cache(tmp_path, tiny_model):
    clip, _, pp = common.load_clip(tiny_model)
    _, eval_tf = common.image_transforms(pp, 0.5)
    write_images(tmp_path / "train", 6, seed=5)
    train = FileImages(sorted(str(p) for p in (tmp_path / "train").iterdir()), [0] * 6)
    pool_tsv = make_pool(tmp_path / "pool", train.paths[:4])
    images, captions, bad = arf.read_pool(str(pool_tsv), "filepath", "title", "\t")
    assert bad == 4 and len(images) == 4 + 30 + 1 and captions[0] == "a copy of image 0"

    cache = tmp_path / "pool-emb.npy"
    emb, ok = arf.embed_images(clip, images, eval_tf, cache, 8, torch.device("cpu"))
    assert emb.dtype == np.float16 and isinstance(emb, np.memmap) and ok.sum() == 34 and not ok[-1]
    rows = np.flatnonzero(ok)
    query, _ = arf.embed_images(clip, train, eval_tf, tmp_path / "q.npy", 4, torch.device("cpu"))
    top = arf.search(arf.build_index(rows_emb := np.asarray(emb[rows], dtype=np.float32)), query[:4], 1)
    assert (rows[top[:, 0]] == np.arange(4)).all()  # each training image finds its own copy
    assert rows_emb.shape == (34, 32)

    def fail(*_):
        raise AssertionError("the cached embeddings should have been reused")

    clip.encode_image = fail
    again, ok2 = arf.embed_images(clip, images, eval_tf, cache, 8, torch.device("cpu"))
    assert np.array_equal(np.asarray(again), np.asarray(emb)) and np.array_equal(ok, ok2)


def test_arf_on_siglip_trains_with_the_sigmoid_loss_and_moves_its_bias(tmp_path, folder_data, tiny_siglip):
    """On a model with a logit bias (SigLIP) each of ARF's losses is the sigmoid loss it was pretrained
    with (duplicates positive), the bias gets a gradient, and a run moves it."""
    torch.manual_seed(0)
    clip, tok, _ = common.load_clip(tiny_siglip)
    classes = ["cat", "dog", "owl"]
    model = common.set_trainable(common.ClipClassifier(clip, zeroshot_head(clip, tok, classes, ["a photo of a {}."]), tok),
                                 text=True, scale=True).train()
    captions = ["a photo of the cat", "a dog on the grass", "a photo of the cat", "owl"]
    loss_fn = arf.make_loss_fn(model, classes, captions)
    label, index = torch.tensor([0, 1, 0, 2]), torch.arange(4)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": label, "index": index, "host": {"label": label, "index": index}}
    rows = loss_fn.embed(model, batch, 0)
    scale, bias = model.scale, model.clip.logit_bias
    loss, terms = loss_fn.loss(rows, scale, bias)
    sig = common.sigmoid_contrastive_loss
    want = (arf.W_FT * sig(rows["image"], rows["class_text"], scale, bias, batch["label"])
            + arf.W_CAP * sig(rows["image"], rows["caption"], scale, bias, torch.tensor([0, 1, 0, 2])))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and set(terms) == {"l_ft", "l_cap"}
    assert abs(terms["l_ft"].item() - common.clip_contrastive_loss(rows["image"], rows["class_text"], scale, batch["label"]).item()) > 1
    loss.backward()
    assert model.clip.logit_bias.grad.abs().item() > 0
    caps = tmp_path / "caps.tsv"
    caps.write_text("".join(f"{p}\ta {p.parent.name} number {p.stem}\n" for p in sorted(Path(folder_data, "train").glob("*/*.jpg"))))
    run_script([str(REPO / "arf.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_siglip, "--steps", "2",
                "--batch-size", "8", "--lr", "1e-2", "--workers", "0", "--captioner", "dataset", "--captions", str(caps),
                "--no-ret", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run")], cwd=tmp_path)
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)["model"]
    assert final["clip.logit_bias"].item() != -10.0
