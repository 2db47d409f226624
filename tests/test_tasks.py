"""The dataset layer (tasks/): each dataset family's folder rules on generated trees (ImageNet and its
shifts, ObjectNet, DomainNet, folders), odd and broken images, empty classes."""
import json
import re
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



EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                   "Residential", "River", "SeaLake"]  # EuroSAT's 2750/ class folders


def test_named_suite_maps_class_folders_to_the_packages_names_and_templates(tmp_path, capsys):
    """--zeroshot-data eurosat=DIR: sorted class folders -> clip_benchmark's names in its index order, its
    EuroSAT templates; folders named 0..K-1 map by number, folders named by the names map by name
    (whatever their order); an empty class folder keeps its class in the label space."""
    for k, name in enumerate(EUROSAT_FOLDERS):
        write_images(tmp_path / "eurosat" / name, 0 if name == "Forest" else 1, seed=k)
    task = tasks.load_task("folder", str(write_folder_task(tmp_path)), zeroshot_data=f"EuroSAT={tmp_path / 'eurosat'}")
    split = task.tests[-1]
    assert (split.name, split.kind) == ("eurosat", "zeroshot")
    assert split.classnames[:3] == ["annual crop land", "forest", "brushland or shrubland"]
    assert split.classnames[-1] == "lake or sea" and len(split.classnames) == 10
    assert split.templates == ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                               "a centered satellite photo of the {}."]
    labels = {Path(p).parent.name: int(y) for p, y in zip(split.images.paths, split.images.labels)}
    assert labels == {f: i for i, f in enumerate(EUROSAT_FOLDERS) if f != "Forest"}
    assert "AnnualCrop -> annual crop land" in capsys.readouterr().out
    for k, folder in enumerate(["07", "3", "0", "1", "2", "4", "5", "6", "8", "9"]):  # by number, not by string order
        write_images(tmp_path / "numbered" / folder, 1, seed=k)
    split = tasks.suites.load_suite_folder(f"eurosat={tmp_path / 'numbered'}")
    assert {Path(p).parent.name: int(y) for p, y in zip(split.images.paths, split.images.labels)}["07"] == 7
    names = split.classnames
    for k, name in enumerate(reversed(names)):  # folders named by the names: 'Lake_or_Sea' is class 9 though sorted elsewhere
        write_images(tmp_path / "named" / name.title().replace(" ", "_"), 1, seed=k)
    split = tasks.suites.load_suite_folder(f"eurosat={tmp_path / 'named'}")
    labels = {Path(p).parent.name: int(y) for p, y in zip(split.images.paths, split.images.labels)}
    assert labels["Lake_Or_Sea"] == 9 and labels["Annual_Crop_Land"] == 0 and split.classnames == names


def test_suite_without_package_names_takes_folder_names_and_the_suites_templates(tmp_path):
    """cifar10=DIR: clip_benchmark has CIFAR-10's templates but takes its names from the dataset files,
    so the class folders name the classes; 10 of them, not numbers."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for k, name in enumerate(classes):
        write_images(tmp_path / "c10" / name, 1, seed=k)
    split = tasks.suites.load_suite_folder(f"cifar10={tmp_path / 'c10'}")
    assert split.name == "cifar10" and split.classnames == classes and len(split.templates) == 18
    assert split.templates[:2] == ["a photo of a {}.", "a blurry photo of a {}."]
    for k in range(10):
        write_images(tmp_path / "n10" / str(k), 1, seed=k)
    with pytest.raises(SystemExit, match="must be named by the class names"):
        tasks.suites.load_suite_folder(f"cifar10={tmp_path / 'n10'}")


def write_folder_task(tmp_path) -> Path:
    for split in ("train", "test"):
        for k, name in enumerate(["cat", "dog"]):
            write_images(tmp_path / "task" / split / name, 2, seed=k)
    return tmp_path / "task"


@pytest.mark.parametrize("spec, message", [
    ("food=", "unknown suite 'food'; known suites: caltech101, cars, cifar10"),
    ("eurosat=", "has 9 class folders but eurosat has 10 classes"),
    ("cifar100=", "has 9 class folders but cifar100 has 100 classes"),
    ("eurosat=missing", "is not a folder"),
    ("eurosat=numbered", "must be 0..9 (the class index)")])
def test_bad_suite_gives_one_message(tmp_path, spec, message):
    for k, name in enumerate(EUROSAT_FOLDERS[:9]):
        write_images(tmp_path / "nine" / name, 1, seed=k)
    for k in range(1, 11):  # Flowers102-style 1-based labels: stopped, not shifted
        write_images(tmp_path / "numbered" / str(k), 1, seed=k)
    name, folder = spec.split("=")
    with pytest.raises(SystemExit, match="error: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        tasks.load_task("folder", str(write_folder_task(tmp_path)), zeroshot_data=f"{name}={tmp_path / (folder or 'nine')}")


def test_named_suite_without_clip_benchmark_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    for module in ("clip_benchmark", "clip_benchmark.datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(SystemExit, match="error: .*pip install --no-deps clip_benchmark"):
        tasks.suites.load_suite_folder(f"eurosat={tmp_path}")


# ------------------------------------------------------------------------------------- --shots
def few_shot_tree(root: Path, counts: dict) -> str:
    for k, (name, n) in enumerate(counts.items()):
        write_images(root / "train" / name, n, seed=k, size=(8, 8))
        write_images(root / "test" / name, 2, seed=10 + k, size=(8, 8))
    return str(root)


def shot_paths(task) -> list:
    return list(task.train.images.paths)


def test_shots_draw_k_per_class_by_seed_apart_from_the_held_out_slice(tmp_path):
    root = few_shot_tree(tmp_path, {"cat": 30, "dog": 25, "owl": 40})
    full = tasks.load_task("folder", root, seed=0)
    task = tasks.load_task("folder", root, seed=0, shots=4)
    labels = task.train.images.labels
    assert np.bincount(labels).tolist() == [4, 4, 4]
    assert set(shot_paths(task)) <= set(shot_paths(full))  # drawn from the training split less the held-out slice
    assert task.heldout.images.paths == full.heldout.images.paths  # the dataset's own held-out slice, whatever K
    assert not set(shot_paths(task)) & set(task.heldout.images.paths)
    assert [s.images.paths for s in task.tests] == [s.images.paths for s in full.tests]  # test splits unchanged
    assert shot_paths(tasks.load_task("folder", root, seed=0, shots=4)) == shot_paths(task)  # a function of the seed
    other = tasks.load_task("folder", root, seed=1, shots=4)
    assert shot_paths(other) != shot_paths(task)
    assert not set(shot_paths(other)) & set(other.heldout.images.paths)
    assert set(shot_paths(tasks.load_task("folder", root, seed=0, shots=2))) < set(shot_paths(task))  # nested in K
    assert tasks.load_task("folder", root, seed=0, shots=0).train.images.paths == full.train.images.paths


def test_shots_draw_of_a_class_depends_on_the_seed_and_that_class_alone():
    """In-memory images (miniworld's kind), each image's pixel its id: growing one class moves no other's draw."""
    def images(n_b: int):
        ids = np.concatenate([np.arange(10), 100 + np.arange(n_b), 200 + np.arange(10)])
        labels = np.repeat([0, 1, 2], [10, n_b, 10])
        return tasks.ArrayImages(ids.astype(np.uint8)[:, None, None, None], labels)

    def drawn(imgs, seed=5):
        picked = tasks.few_shot(imgs, 3, seed, ["a", "b", "c"])
        assert np.bincount(picked.labels).tolist() == [3, 3, 3]
        return {c: set(picked.images[picked.labels == c].ravel().tolist()) for c in range(3)}

    small, large = drawn(images(10)), drawn(images(20))
    assert small[0] == large[0] and small[2] == large[2]
    assert drawn(images(10), seed=6) != small


@pytest.mark.parametrize("shots, message", [
    (12, "--shots 12 needs 12 training images per class (after the held-out slice), but class 'dog' has "),
    (-1, "--shots must be >= 0 (got -1)"),
])
def test_shots_beyond_a_class_or_negative_say_so(tmp_path, shots, message):
    root = few_shot_tree(tmp_path, {"cat": 30, "dog": 12})
    with pytest.raises(SystemExit, match="^error: ") as e:
        tasks.load_task("folder", root, seed=0, shots=shots)
    assert message in str(e.value)


# ------------------------------------------------------------------------------------- --source-domain
def make_domainnet_tree(root: Path, domains=("real", "clipart", "sketch"), classes=("apple", "bus", "zebra"), n=4):
    """Each domain's images and official split files: the first half of a class's images in train, the rest in test."""
    for d, domain in enumerate(domains):
        for part, images in (("train", range(n // 2)), ("test", range(n // 2, n))):
            lines = []
            for label, name in enumerate(classes):
                write_images(root / domain / name, n, seed=10 * d + label, size=(8, 8))
                lines += [f"{domain}/{name}/img{i}.jpg {label}" for i in images]
            (root / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_source_domain_trains_on_it_and_scores_the_others_as_ood(tmp_path):
    make_domainnet_tree(tmp_path)
    task = tasks.load_task("domainnet", str(tmp_path), source_domain="clipart")
    train = task.train.images.paths + task.heldout.images.paths
    assert sorted(train) == sorted(str(tmp_path / "clipart" / c / f"img{i}.jpg") for c in ("apple", "bus", "zebra")
                                   for i in range(2))
    assert [(s.name, s.kind) for s in task.tests] == [("clipart", "id"), ("real", "ood"), ("sketch", "ood")]
    assert all(Path(p).parts[-3] == s.name for s in task.tests for p in s.images.paths)
    assert task.classnames == ["apple", "bus", "zebra"]
    default = tasks.load_task("domainnet", str(tmp_path))  # today's task: real is ID
    assert [(s.name, s.kind) for s in default.tests] == [("real", "id"), ("clipart", "ood"), ("sketch", "ood")]
    assert all("/real/" in p for p in default.train.images.paths)
    with pytest.raises(SystemExit, match="painting_train.txt not found"):
        tasks.load_task("domainnet", str(tmp_path), source_domain="painting")


@pytest.mark.parametrize("data, source, message", [
    ("domainnet", "quickdraw", "unknown --source-domain 'quickdraw'; choose one of real, painting, clipart"),
    ("folder", "clipart", "--source-domain 'clipart' is for --data domainnet only (got --data folder)"),
])
def test_source_domain_unknown_or_without_domainnet_says_so(data, source, message):
    with pytest.raises(SystemExit, match="^error: ") as e:
        common.make_args(common.TrainArgs, data, source_domain=source)
    assert message in str(e.value)


def test_source_domain_end_to_end_rows_name_its_test_split_id(tmp_path, tiny_model):
    from conftest import run_script

    make_domainnet_tree(tmp_path / "dn")
    run_script(["baselines.py", "--method", "zeroshot", "--data", "domainnet", "--data-root", str(tmp_path / "dn"),
                "--source-domain", "sketch", "--model", tiny_model, "--workers", "0", "--out", str(tmp_path / "r")],
               cwd=Path(__file__).parents[1])
    rows = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [(r["split"], r["kind"]) for r in rows] == [("sketch", "id"), ("real", "ood"), ("clipart", "ood")]
    assert {r["config"]["source_domain"] for r in rows} == {"sketch"}


def test_unseen_classes_keep_the_label_space_and_test_images_but_leave_training(folder_data, tmp_path):
    """--unseen-classes (generalized zero-shot): the listed classes stay in the label space and in every
    test folder, but none of their training images is in the training split or the held-out slice."""
    (tmp_path / "unseen.txt").write_text("owl\n\nred_fox\n")
    plain = tasks.load_task("folder", folder_data)
    task = tasks.load_task("folder", folder_data, unseen_classes=str(tmp_path / "unseen.txt"))
    assert task.classnames == plain.classnames == ["cat", "dog", "owl", "red fox"]
    assert task.unseen == [2, 3] and plain.unseen == []
    drawn = np.concatenate([task.train.images.labels, task.heldout.images.labels])
    assert len(drawn) == 24 and set(drawn.tolist()) == {0, 1}  # the 12 cat and 12 dog images only
    assert all(p.split("/")[-2] in ("cat", "dog") for p in task.train.images.paths)
    for t, p in zip(task.tests, plain.tests):  # the test folders keep every class
        assert t.images.paths == p.images.paths and set(t.images.labels.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("lines, data, message", [
    (None, "folder", "is not a file"),
    ("", "folder", "is empty"),
    ("\n  \n", "folder", "is empty"),
    ("owl\nbird\nfish\n", "folder", "names 2 class(es) that are not class folders with images in"),
    ("cat\ndog\nowl\nred_fox\n", "folder", "names all 4 classes"),
    ("owl\n", "miniworld", "--unseen-classes is an option of --data folder"),
])
def test_a_bad_unseen_classes_file_gives_one_message(folder_data, tmp_path, lines, data, message):
    path = tmp_path / "unseen.txt"
    if lines is not None:
        path.write_text(lines)
    with pytest.raises(SystemExit, match="^error: .*" + re.escape(message)):
        tasks.load_task(data, folder_data if data == "folder" else "", unseen_classes=str(path))


def test_shots_with_unseen_classes_draw_k_images_of_each_seen_class_only(folder_data, tmp_path):
    (tmp_path / "unseen.txt").write_text("owl\n")
    task = tasks.load_task("folder", folder_data, shots=2, unseen_classes=str(tmp_path / "unseen.txt"))
    counts = np.bincount(np.asarray(task.train.images.labels), minlength=4)
    assert task.unseen == [2] and counts.tolist() == [2, 2, 0, 2]  # classes in folder order: cat, dog, owl, red_fox


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
            task = tasks.load_task("domainbed", str(root), seed, test_domain=test)
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
    task = tasks.load_task("domainbed", root, 0, test_domain="east")
    assert task.name == "domainbed:mine" and len(task.train.images) == 8 - 2 and len(task.heldout.images) == 2
    for data, domain, message in (("domainbed", "", "--data domainbed needs --test-domain NAME"),
                                  ("domainbed", "west", "--test-domain 'west' is not a domain of " + root
                                   + "; its domains: east, north, south"),
                                  ("folder", "east", "--test-domain 'east' is for --data domainbed")):
        with pytest.raises(SystemExit, match="error: " + message.replace("(", r"\(")):
            tasks.load_task(data, root, 0, test_domain=domain)
    with pytest.raises(SystemExit, match="--test-domain 'east' is for --data domainbed"):
        common.make_args(common.TrainArgs, "folder", test_domain="east")
