"""The dataset layer (tasks/): each dataset family's folder rules on generated trees (ImageNet and its
shifts, ObjectNet, DomainNet, folders), odd and broken images, empty classes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import tasks
from conftest import write_images
from tasks.imagenet import imagenet_wnids, subset_groups

def make_imagenet_tree(root: Path, r_wnids: list):
    wnids = imagenet_wnids()
    for w in wnids:
        write_images(root / "train" / w, 1, seed=int(w[1:]), size=(8, 8))
    for w in wnids[:5]:
        write_images(root / "val" / w, 1, seed=1, size=(8, 8))
    for idx in (2, 10):  # ImageNet-V2 folders are class indices
        write_images(root / "imagenetv2" / str(idx), 2, seed=idx, size=(8, 8))
    for w in r_wnids:
        write_images(root / "imagenet-r" / w, 2, seed=3, size=(8, 8))
    return wnids


def test_imagenet_layout_v2_by_integer_and_r_subset(tmp_path, capsys):
    wnids = imagenet_wnids()
    make_imagenet_tree(tmp_path, r_wnids=[wnids[7], wnids[100], wnids[999]])
    (tmp_path / "imagenetv2" / ".ipynb_checkpoints").mkdir()  # stray folders a notebook or a copy leaves
    (tmp_path / "imagenetv2" / "notes").mkdir()
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    task = tasks.load_task("imagenet", str(tmp_path))
    out = capsys.readouterr().out
    assert "ignoring hidden folder(s) .ipynb_checkpoints" in out and "not class indices 0-999: notes" in out
    assert len(task.classnames) == 1000 and len(task.train.images) + len(task.heldout.images) == 1000
    splits = {s.name: s for s in task.tests}
    assert splits["val"].kind == "id"
    v2 = splits["imagenet-v2"]
    assert sorted(set(v2.images.labels.tolist())) == [2, 10]  # folder "10" is class 10, not class 2
    assert all(f"/{lab}/" in p for p, lab in zip(v2.images.paths, v2.images.labels))
    r = splits["imagenet-r"]  # 3 of the 1000 classes: scored as 3 groups, labels renumbered into them
    assert r.class_groups == [[7], [100], [999]] and sorted(set(r.images.labels.tolist())) == [0, 1, 2]
    assert all(f"/{wnids[[7, 100, 999][lab]]}/" in p for p, lab in zip(r.images.paths, r.images.labels))
    assert "objectnet" not in splits  # optional: scored only when its folder exists


def test_imagenet_train_folders_must_be_imagenet_wnids(tmp_path):
    make_imagenet_tree(tmp_path, r_wnids=[])
    wnids = imagenet_wnids()
    (tmp_path / "train" / wnids[3]).rename(tmp_path / "train" / "n99999999")  # one fake name among 1000 folders
    with pytest.raises(SystemExit, match=rf"1 folder\(s\) are not ImageNet-1k wnids: n99999999. 1 wnid\(s\) have no folder: {wnids[3]}"):
        tasks.load_task("imagenet", str(tmp_path))


def make_objectnet(root: Path, border_colour=(255, 0, 0), inside=(0, 0, 255)):
    """ObjectNet 1.0's layout: images/<folder>/*.png with a 1-px red frame, and its mapping files. The
    pytorch-to-2012 index map is a permutation (p -> 7p + 3 mod 1000), so a loader that skips it fails."""
    maps = root / "mappings"
    maps.mkdir(parents=True)
    (maps / "imagenet_to_label_2012_v2").write_text("".join(f"label {i}\n" for i in range(1000)))
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(p): (7 * p + 3) % 1000 for p in range(1000)}))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "label 5", "Banana": "label 20; label 21", "Chair": "label 999"}))
    folders = {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair", "zebra_toy": "Zebra toy"}
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    rng = np.random.default_rng(0)
    for k, (folder, n) in enumerate(zip(folders, (2, 3, 2, 2))):
        (root / "images" / folder).mkdir(parents=True)
        for i in range(n):
            arr = np.zeros((12, 12, 3), dtype=np.uint8) + np.array(border_colour, dtype=np.uint8)
            arr[1:-1, 1:-1] = (0.5 * rng.integers(0, 255, (10, 10, 3)) + 0.5 * np.array(inside)).astype(np.uint8)
            Image.fromarray(arr).save(root / "images" / folder / f"{i}.png")
    pytorch_of = {(7 * p + 3) % 1000: p for p in range(1000)}
    return [[pytorch_of[5]], sorted([pytorch_of[20], pytorch_of[21]]), [pytorch_of[999]]]


def test_objectnet_frame_cut_and_scored_on_the_mapped_classes(tmp_path, tiny_model):
    make_imagenet_tree(tmp_path, r_wnids=[])
    groups = make_objectnet(tmp_path / "objectnet-1.0")
    task = tasks.load_task("imagenet", str(tmp_path))
    split = next(s for s in task.tests if s.name == "objectnet")
    assert split.kind == "ood" and split.class_groups == groups and len(split.images) == 7  # zebra_toy is not mapped
    assert split.images.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    img = np.asarray(split.images.load(0))
    assert img.shape == (8, 8, 3) and not ((img[..., 0] > 200) & (img[..., 1] < 50)).any()  # no red left
    clip, tok, pp = common.load_clip(tiny_model)
    torch.manual_seed(0)
    model = common.ClipClassifier(clip, F.normalize(torch.randn(1000, 32), dim=-1), tok)
    eval_tf = common.image_transforms(pp, 1.0)[1]
    m = common.evaluate_split(model, split, task, eval_tf, torch.device("cpu"))
    logits, y, _ = common.predict(model, split.images, eval_tf, torch.device("cpu"))  # [7, 1000], frame cut
    projected = torch.stack([logits[:, g].max(1).values for g in groups], 1)  # [7, 3]: the reference's projection
    assert m["n"] == 7 and m["acc"] == pytest.approx((projected.argmax(1) == y).float().mean().item())
    assert m["nll"] == pytest.approx(F.cross_entropy(projected, y).item(), abs=1e-5)
    uncut = tasks.FileImages(split.images.paths, split.images.labels)  # scoring with the frame gives other logits
    assert not torch.allclose(common.predict(model, uncut, eval_tf, torch.device("cpu"))[0], logits, atol=1e-4)
    (tmp_path / "objectnet-1.0" / "mappings" / "objectnet_to_imagenet_1k.json").write_text('{"Banana": "no such label"}')
    with pytest.raises(SystemExit, match="mapping files .* do not agree"):
        tasks.load_task("imagenet", str(tmp_path))


def test_subset_scoring_equals_argmax_over_subset_classes(tmp_path, tiny_model):
    """Scoring ImageNet-R on its subset == argmax restricted to those classes of the full head."""
    clip, tok, pp = common.load_clip(tiny_model)
    torch.manual_seed(0)
    model = common.ClipClassifier(clip, torch.nn.functional.normalize(torch.randn(10, 32), dim=-1), tok)
    subset = [1, 4, 7]
    paths, labels = [], []
    for k in subset:
        write_images(tmp_path / str(k), 4, seed=k)
        paths += [str(p) for p in sorted((tmp_path / str(k)).iterdir())]
        labels += [k] * 4
    images, groups = subset_groups(tasks.FileImages(paths, labels), 10)
    classnames = [f"c{i}" for i in range(10)]
    split = tasks.Split("r", "ood", images, classnames, ["{}"], class_groups=groups)
    task = tasks.Task("t", classnames, ["{}"], split, split, [split])
    eval_tf = common.image_transforms(pp, 1.0)[1]
    m = common.evaluate_split(model, split, task, eval_tf, torch.device("cpu"))
    logits, y, _ = common.predict(model, images, eval_tf, torch.device("cpu"))
    pred = torch.tensor(subset)[logits[:, subset].argmax(-1)]
    assert torch.equal(torch.tensor(subset)[y], torch.tensor(labels))  # labels index the groups
    assert m["acc"] == pytest.approx((pred == torch.tensor(labels)).float().mean().item())
    assert m["n"] == 12


def test_domainnet_class_order_from_split_files_whatever_folder_case(tmp_path):
    classes = ["aircraft_carrier", "The_Eiffel_Tower", "zebra"]
    for domain in ("real", "sketch"):
        lines = []
        for label, name in enumerate(classes):
            folder = name.lower() if domain == "sketch" else name  # different case per domain
            write_images(tmp_path / domain / folder, 2, seed=label, size=(8, 8))
            lines += [f"{domain}/{folder}/img{i}.jpg {label}" for i in range(2)]
        for part in ("train", "test"):
            (tmp_path / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")
    task = tasks.load_task("domainnet", str(tmp_path))
    assert task.classnames == ["aircraft carrier", "the eiffel tower", "zebra"]
    sketch = next(s for s in task.tests if s.name == "sketch")
    assert sketch.kind == "ood" and sketch.classnames == task.classnames
    assert sketch.images.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_odd_images_are_converted_and_broken_ones_skipped_and_counted(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray((np.arange(400).reshape(20, 20) * 100).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(rgb).save(folder / "ok.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "ok.jpg").read_bytes()[:100])
    paths = sorted(str(p) for p in folder.iterdir())
    images = tasks.FileImages(paths, [0] * len(paths))
    for p in paths:
        img = tasks.load_rgb(p)
        assert (img is None) == p.endswith("truncated.jpg")
        if img is not None:
            assert img.mode == "RGB" and img.size == (20, 20)
    deep = np.asarray(tasks.load_rgb(str(folder / "deep.png")))
    assert deep.max() == 255 and deep.min() == 0  # rescaled, not clipped to white
    tf = common.image_transforms({"size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3}, 1.0)[1]
    forward = lambda x: x.flatten(1)[:, :2]  # noqa: E731
    logits, labels, bad = common.predict(forward, images, tf, torch.device("cpu"), batch_size=4)
    assert bad == 1 and len(labels) == len(paths) - 1



def test_empty_class_folder_is_reported_not_fatal(tmp_path, capsys):
    for name in ("a", "b"):
        write_images(tmp_path / "train" / name, 3, seed=1)
        write_images(tmp_path / "test" / name, 2, seed=2)
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "test" / "c").mkdir()
    task = tasks.load_task("folder", str(tmp_path))
    assert "dropping 1 class(es) with no training images from the label space: c" in capsys.readouterr().out
    assert task.classnames == ["a", "b"]  # issue #20: an empty class leaves the label space (it used to stay in it)


def test_a_dropped_class_names_its_unscored_test_images_and_a_tree_without_id_split_says_so(tmp_path, tiny_model):
    """An empty training class leaves the label space: its test images vanish from every split, so the run
    says how many, per split; without test/ or val/ there is no ID split, said at start."""
    from conftest import run_script

    for name in ("a", "b"):
        write_images(tmp_path / "d" / "train" / name, 3, seed=1)
        write_images(tmp_path / "d" / "sketch" / name, 2, seed=2)
    (tmp_path / "d" / "train" / "c").mkdir()
    write_images(tmp_path / "d" / "sketch" / "c", 6, seed=3)
    proc = run_script(["baselines.py", "--method", "zeroshot", "--data", "folder", "--data-root", str(tmp_path / "d"),
                       "--model", tiny_model, "--out", str(tmp_path / "r")], cwd=Path(__file__).parents[1])
    out = proc.stdout
    assert "class 'c' has no training images, so its 6 image(s) in sketch/ are not scored" in out
    assert "has no test/ or val/ folder, so the run has no in-distribution (ID) split: sketch are scored as OOD" in out



def test_domainbed_holds_out_a_fixed_fifth_of_each_training_domain_and_scores_only_the_left_out_one(tmp_path):
    """Leave-one-domain-out: for every test domain, the training domains split 80/20 into train and held-out
    (round(20%) of each domain), the test domain is the one scored split (ood) and never in train or
    held-out; a domain's held-out images are the same for every seed and whichever domain is left out."""
    from conftest import PACS_DOMAINS, write_domain_tree

    root = Path(write_domain_tree(tmp_path / "pacs", n=6))  # 12 images per domain: 2 (round(2.4)) held out
    images = {d: {str(p) for p in (root / d).rglob("*.jpg")} for d in PACS_DOMAINS}
    held_of = {}
    for test in PACS_DOMAINS:
        for seed in (0, 1):
            task = tasks.load_task("domainbed", str(root), seed, "", test)
            assert task.name == "PACS" and task.classnames == ["cat", "red fox"]
            assert [(s.name, s.kind) for s in task.tests] == [(test, "ood")]
            assert set(task.tests[0].images.paths) == images[test]
            train, held = set(task.train.images.paths), set(task.heldout.images.paths)
            assert not (train | held) & images[test] and not train & held
            for d in PACS_DOMAINS:
                if d != test:
                    assert train | held >= images[d] and len(held & images[d]) == round(0.2 * len(images[d]))
                    assert held_of.setdefault(d, held & images[d]) == held & images[d]  # seeds and test domains alike
            labels = dict(zip(task.heldout.images.paths, task.heldout.images.labels))
            assert all(labels[p] == (1 if "/red_fox/" in p else 0) for p in held)
    assert all(len(h) == 2 for h in held_of.values())


def test_domainbed_messages_and_any_folder_of_domains(tmp_path):
    """A missing, unknown or misplaced --test-domain is one message (an unknown one lists the domains);
    domain folders of no DomainBed dataset are a task named after their folder."""
    from conftest import write_domain_tree

    root = write_domain_tree(tmp_path / "mine", domains=("north", "south", "east"), n=2)
    task = tasks.load_task("domainbed", root, 0, "", "east")
    assert task.name == "domainbed:mine" and len(task.train.images) == 8 - 2 and len(task.heldout.images) == 2
    for data, domain, message in (("domainbed", "", "--data domainbed needs --test-domain NAME"),
                                  ("domainbed", "west", "--test-domain 'west' is not a domain of " + root
                                   + "; its domains: east, north, south"),
                                  ("folder", "east", "--test-domain 'east' is for --data domainbed")):
        with pytest.raises(SystemExit, match="error: " + message.replace("(", r"\(")):
            tasks.load_task(data, root, 0, "", domain)
    with pytest.raises(SystemExit, match="--test-domain 'east' is for --data domainbed"):
        common.make_args(common.TrainArgs, "folder", test_domain="east")
