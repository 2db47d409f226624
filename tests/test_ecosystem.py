"""Runs in and out of the repo: export to open_clip and import back (the round trip, merges of an imported
run, refusals), --report-to tensorboard read back, `evaluate.py curves`, top-5 / per-class recall, and
`table --format csv|json`."""
import json
from pathlib import Path

import pytest
import torch

import baselines
import common
import evaluate
import merge
from conftest import COLOURS, stable_seed, write_images


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: torch on one thread for the module


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, tiny_model):
    """One short FT run on a generated 4-class folder (random-weight tiny ViT, seed 0), made once; its
    WiSE-FT α = 0 and 1 rows written; every test writes its own outputs."""
    base = tmp_path_factory.mktemp("eco")
    data = base / "folder"
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(data / split / name, n, seed=stable_seed(split, k), colour=COLOURS[k])
    run = base / "runs" / "ft"
    baselines.main(["--method", "ft", "--data", "folder", "--data-root", str(data), "--model", tiny_model, "--steps", "3",
                    "--batch-size", "8", "--lr", "1e-3", "--eval-every", "2", "--workers", "0", "--report-to", "tensorboard",
                    "--out", str(run)])
    merge.main(["wise", "--ckpt", str(run), "--alphas", "0,1", "--workers", "0", "--plot", str(base / "w.png")])
    return {"run": run, "data": str(data), "model": tiny_model}


def rows_of(run: Path, tag: str = "") -> dict:
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    return {r["split"]: {k: r[k] for k in ("acc", "ece", "nll", "n", "top5", "recall") if k in r} for r in rows if r["tag"] == tag}


def image_batch():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # [B, 3, H, W]


def test_round_trip_export_open_clip_import_eval_and_wise(ft_run, tmp_path):
    import open_clip

    evaluate.main(["export", str(ft_run["run"]), "--out", str(tmp_path / "exp")])
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == sorted([*evaluate.EXPORTED, "tiny-vit.json"])
    assert json.loads((tmp_path / "exp" / "tiny-vit.json").read_text()) == json.loads(Path(ft_run["model"]).read_text())
    open_clip.add_model_config(tmp_path / "exp" / "tiny-vit.json")  # the architecture as exported
    clip, _, _ = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(tmp_path / "exp" / evaluate.EXPORTED[0]))
    run = common.load_run(ft_run["run"], "cpu")
    with torch.no_grad():
        want, got = run.model.clip.eval().encode_image(image_batch()), clip.eval().encode_image(image_batch())  # [B, D]
    assert (want - got).abs().max() <= 1e-6
    head = torch.load(tmp_path / "exp" / "head.pt", weights_only=True)  # a plain file: no pickled code
    assert torch.equal(head["head"], run.model.head.detach()) and head["classnames"] == run.task.classnames
    assert head["head_from_text"] is False and head["logit_scale"] == run.model.clip.logit_scale.item()

    imported = tmp_path / "runs" / "imp"
    evaluate.main(["import", str(tmp_path / "exp" / evaluate.EXPORTED[0]), "--model", ft_run["model"], "--data", "folder",
                   "--data-root", ft_run["data"], "--head", str(tmp_path / "exp" / "head.pt"), "--workers", "0", "--out", str(imported)])
    original = rows_of(ft_run["run"])
    assert rows_of(imported) == original and set(original) == {"test", "sketch"}
    config = json.loads((imported / "results.jsonl").read_text().splitlines()[0])["config"]
    assert "exp/open_clip_model.pt (sha1 " in config["imported"]  # its rows never average with a run trained here

    merge.main(["wise", "--ckpt", str(imported), "--alphas", "0,1", "--workers", "0", "--plot", str(tmp_path / "w.png")])
    for tag in ("wise a=0", "wise a=1"):
        assert rows_of(imported, tag) == rows_of(ft_run["run"], tag), tag
    assert rows_of(imported, "wise a=1") == original
    merge.main(["soup", "--kind", "uniform", "--ckpt", str(ft_run["run"]), str(imported), "--workers", "0",
                "--out", str(tmp_path / "runs" / "soup")])  # one initialisation and the same weights: the run itself
    assert rows_of(tmp_path / "runs" / "soup", "soup uniform") == original

    # the default head is the zero-shot head of the checkpoint's own text tower: FT leaves that tower as θ0's,
    # so the imported run with it is WiSE-FT's α = 0 head on the fine-tuned image tower
    evaluate.main(["import", str(tmp_path / "exp" / evaluate.EXPORTED[0]), "--model", ft_run["model"], "--data", "folder",
                   "--data-root", ft_run["data"], "--workers", "0", "--out", str(tmp_path / "runs" / "zshead")])
    zs = common.load_run(tmp_path / "runs" / "zshead", "cpu")
    assert zs.meta["head_from_text"] is True
    assert torch.equal(zs.model.head, common.run_theta0(run, "cpu").head)


def test_import_of_a_wrapper_with_a_linear_head_and_no_text_transformer(ft_run, tmp_path, capsys):
    """model soups' layout: the CLIP under "model.", its text transformer deleted, a linear head on n(f(x))."""
    run = common.load_run(ft_run["run"], "cpu")
    scale = run.model.scale.detach()
    wrapped = {f"model.{k}": v for k, v in run.model.clip.state_dict().items() if not k.startswith("transformer.")}
    for bias, name in ((torch.zeros(4), "soup.pt"), (torch.full((4,), 0.5), "soup_bias.pt")):
        torch.save({**wrapped, "classification_head.weight": scale * run.model.head.detach(), "classification_head.bias": bias},
                   tmp_path / name)
    base = ["--model", ft_run["model"], "--data", "folder", "--data-root", ft_run["data"], "--workers", "0"]
    evaluate.main(["import", str(tmp_path / "soup.pt"), *base, "--out", str(tmp_path / "runs" / "soup")])
    got, want = rows_of(tmp_path / "runs" / "soup"), rows_of(ft_run["run"])
    assert {s: r["acc"] for s, r in got.items()} == {s: r["acc"] for s, r in want.items()}
    assert all(got[s]["nll"] == pytest.approx(want[s]["nll"], abs=1e-6) for s in want)
    imported = common.load_run(tmp_path / "runs" / "soup", "cpu")
    theta0 = common.run_theta0(run, "cpu").state_dict()
    assert imported.meta["head_from_text"] is False and torch.allclose(imported.model.head, run.model.head, atol=1e-6)
    assert all(torch.equal(v, theta0[k]) for k, v in imported.model.state_dict().items() if k.startswith("clip.transformer."))
    assert "bias" not in capsys.readouterr().out
    evaluate.main(["import", str(tmp_path / "soup_bias.pt"), *base, "--out", str(tmp_path / "runs" / "b")])
    assert "note: its head's bias (max |b| 0.5) is dropped" in capsys.readouterr().out
    evaluate.main(["import", str(tmp_path / "soup.pt"), *base, "--head", "text", "--out", str(tmp_path / "runs" / "t")])
    assert common.load_run(tmp_path / "runs" / "t", "cpu").meta["head_from_text"] is True


def test_export_of_a_merged_run_and_of_wise_alpha(ft_run, tmp_path):
    merge.main(["soup", "--kind", "uniform", "--ckpt", str(ft_run["run"]), str(ft_run["run"]), "--workers", "0",
                "--out", str(tmp_path / "soup")])
    evaluate.main(["export", str(tmp_path / "soup"), "--out", str(tmp_path / "e1")])
    run = common.load_run(ft_run["run"], "cpu")
    soup = torch.load(tmp_path / "e1" / "open_clip_model.pt", weights_only=True)
    assert all(torch.equal(soup[k], v) for k, v in run.model.clip.state_dict().items())  # a soup of one run is that run
    evaluate.main(["export", str(ft_run["run"]), "--alpha", "0", "--out", str(tmp_path / "e0")])
    theta0 = common.run_theta0(run, "cpu")
    zero = torch.load(tmp_path / "e0" / "open_clip_model.pt", weights_only=True)
    assert all(torch.equal(zero[k], v) for k, v in theta0.clip.state_dict().items())
    assert torch.equal(torch.load(tmp_path / "e0" / "head.pt", weights_only=True)["head"], theta0.head.detach())


def test_import_refuses_another_architecture_or_initialisation(ft_run, tmp_path, tiny_model):
    common.seed_everything(1)  # the tiny ViT with seed 1's random weights: another initialisation
    other, _, _ = common.load_clip(tiny_model)
    torch.save(other.state_dict(), tmp_path / "other_init.pt")
    torch.save({"state_dict": {k: v for k, v in other.state_dict().items() if k != "text_projection"}},
               tmp_path / "other_arch.pt")
    base = ["--model", tiny_model, "--data", "folder", "--data-root", ft_run["data"], "--workers", "0"]
    with pytest.raises(SystemExit, match=r"not a fine-tune of --model .* \(seed 0\): image tower cosine 0\.\d+ with θ0's"):
        evaluate.main(["import", str(tmp_path / "other_init.pt"), *base, "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"not a fine-tune .*: 1 tensor\(s\) missing, extra or of another shape \(text_projection\)"):
        evaluate.main(["import", str(tmp_path / "other_arch.pt"), *base, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit, match=r"^error: --head nothere.pt is not a file"):
        evaluate.main(["import", str(tmp_path / "other_init.pt"), *base, "--seed", "1", "--head", "nothere.pt", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match=r"^error: could not read .*gone.pt as an open_clip checkpoint"):
        evaluate.main(["import", str(tmp_path / "gone.pt"), *base, "--out", str(tmp_path / "e")])
    # the same weights declared as seed 1's are accepted: the rule is "from the stated initialisation"
    evaluate.main(["import", str(tmp_path / "other_init.pt"), *base, "--seed", "1", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "results.jsonl").is_file()


# ---------------------------------------------------------------- --report-to
def tensorboard_scalars(run: Path) -> dict:
    """{tag: {step: value}} of every event file in RUN/tensorboard, as TensorBoard shows them (an earlier
    file's steps purged by a resumed run's purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert all(len({s for s, _ in v}) == len(v) for v in scalars.values()), "a step shown twice"
    return {tag: dict(v) for tag, v in scalars.items()}


def as_float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()  # event files hold float32


def test_report_to_tensorboard_logs_what_log_jsonl_logs_and_a_resume_purges_the_redone_steps(ft_run, tmp_path):
    log = [json.loads(x) for x in (ft_run["run"] / "log.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "lr", "grad_norm", "images_per_s", "heldout_acc"} <= {k for r in log for k in r}
    want = {k: {r["step"]: as_float32(r[k]) for r in log if k in r} for k in {k for r in log for k in r} - {"step"}}
    assert tensorboard_scalars(ft_run["run"]) == want

    run = tmp_path / "r"  # killed after step 2's checkpoint, before its rows: the resume redoes steps 3 and 4
    micro = ["--method", "ft", "--data", "folder", "--data-root", ft_run["data"], "--model", ft_run["model"], "--steps", "4",
             "--batch-size", "8", "--lr", "1e-3", "--ckpt-every", "2", "--keep-checkpoints", "--workers", "0", "--out", str(run)]
    baselines.main([*micro, "--report-to", "tensorboard"])
    first = tensorboard_scalars(run)["loss"]
    (run / "final.pt").unlink()
    (run / "results.jsonl").unlink()
    baselines.main([*micro, "--resume"])  # no tracker on the resume: the event files keep the first pass
    assert tensorboard_scalars(run)["loss"] == first
    for f in (run / "final.pt", run / "results.jsonl"):
        f.unlink()
    baselines.main([*micro, "--report-to", "tensorboard", "--resume"])  # a resume may turn tracking on (not the run's identity)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and len(list((run / "tensorboard").iterdir())) == 2
    assert tensorboard_scalars(run)["loss"] == {r["step"]: as_float32(r["loss"]) for r in log}


def test_report_to_is_not_part_of_the_configuration_and_a_missing_package_is_one_message(monkeypatch):
    args = common.make_args(common.TrainArgs, "miniworld")
    assert common.run_config(args, "ft") == common.run_config(common.make_args(common.TrainArgs, "miniworld",
                                                                               report_to="tensorboard"), "ft")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match=r"^error: --report-to tensorboard,wandb needs wandb, which is not installed: "
                                         r"pip install wandb$"):
        common.make_args(common.TrainArgs, "miniworld", report_to="tensorboard,wandb")
    with pytest.raises(SystemExit, match="unknown mlflow"):
        common.make_args(common.TrainArgs, "miniworld", report_to="mlflow")



def test_report_to_wandb_logs_each_line_at_its_step_into_one_run_per_folder(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module records what tracking.Trackers asks of it."""
    import importlib.util
    import sys
    import types

    import tracking

    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", values, step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    for start in (0, 2):  # a run, then its resume: the same W&B run id
        track = tracking.Trackers("wandb", tmp_path / "r", {"lr": 1e-5}, start)
        track.log({"step": start + 1, "loss": 0.5, "lr": 1e-5})
        track.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0] == inits[1] and inits[0]["config"] == {"lr": 1e-5} and inits[0]["resume"] == "allow"
    assert [c for c in calls if c[0] == "log"] == [("log", {"loss": 0.5, "lr": 1e-5}, 1), ("log", {"loss": 0.5, "lr": 1e-5}, 3)]
    assert calls.count(("finish",)) == 2


# ---------------------------------------------------------------- curves
def test_curves_draws_every_loss_term_and_heldout_accuracy_and_names_a_missing_or_empty_log(ft_run, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    log = [json.loads(x) for x in (ft_run["run"] / "log.jsonl").read_text().splitlines()]
    (other / "log.jsonl").write_text("".join(json.dumps({**r, "loss": r["loss"] / 2, "reg": r["step"] / 10}) + "\n" for r in log))
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its lines back
    out = evaluate.main(["curves", str(ft_run["run"]), str(other), "--out", str(tmp_path / "curves.png")])
    assert Path(out).stat().st_size > 10_000
    panels = {ax.get_title(): [(list(x.get_xdata()), list(x.get_ydata())) for x in ax.lines] for ax in figures[0].axes if ax.lines}
    assert list(panels) == ["loss", "ce", "held-out accuracy (%)", "reg"]  # in log order; step, lr, grad norm, throughput not drawn
    assert panels["loss"] == [([1, 2, 3], [r["loss"] for r in log]), ([1, 2, 3], [r["loss"] / 2 for r in log])]
    assert panels["held-out accuracy (%)"] == [([2], [100 * log[1]["heldout_acc"]])] * 2
    assert panels["reg"] == [([], []), ([1, 2, 3], [0.1, 0.2, 0.3])]  # the first run has no such term: an empty line
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == [str(ft_run["run"]), str(other)]
    (other / "log.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"^error: .*other/log.jsonl is empty: no training steps to draw"):
        evaluate.main(["curves", str(ft_run["run"]), str(other)])
    with pytest.raises(SystemExit, match=r"^error: .*nowhere/log.jsonl is missing: no training steps to draw"):
        evaluate.main(["curves", str(tmp_path / "nowhere")])


# ---------------------------------------------------------------- reporting as the benchmarks do
def test_top5_and_mean_per_class_recall_against_a_hand_computation(ft_run):
    down, up = [7., 6., 5., 4., 3., 2., 1.], [1., 2., 3., 4., 5., 6., 7.]  # class 0 first / class 6 first
    logits = torch.tensor([down, down, down, down, up, up])  # [6, 7]
    labels = torch.tensor([0, 6, 4, 5, 0, 6])  # ranks 1, 7, 5, 6, 7, 1
    m = common.classification_metrics(logits, labels)
    assert m["acc"] == pytest.approx(2 / 6)
    assert m["top5"] == pytest.approx(3 / 6)  # ranks 1, 5 and 1 are within the top 5
    assert m["recall"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 0) / 4)  # classes 0 and 6: 1 of 2 each; 4 and 5: 0 of 1
    assert common.classification_metrics(logits[:, :3], torch.tensor([0, 2, 1, 1, 0, 2]))["top5"] == 1.0  # K <= 5
    for row in rows_of(ft_run["run"]).values():  # every results row carries them; 4 classes: top-5 is 1
        assert row["top5"] == 1.0 and 0 <= row["recall"] <= 1


def test_table_csv_and_json_carry_the_configuration_metrics_and_clip_benchmark_names(tmp_path, capsys):
    import csv

    rows = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        for split, kind in (("val", "id"), ("imagenet-v2", "ood"), ("imagenet-sketch", "ood"), ("objectnet", "ood")):
            rows.append({"run": f"runs/ft-s{seed}", "method": "ft", "tag": "", "data": "imagenet", "model": "ViT-B-16",
                         "pretrained": "openai", "split": split, "kind": kind, "acc": acc, "top5": acc + 0.2, "recall": acc - 0.1,
                         "ece": 0.1, "nll": 1.0, "n": 10, "seed": seed, "config": {"lr": 1e-5, "data": "imagenet"}, "config_id": "abc"})
    rows.append({"run": "runs/zs", "method": "zeroshot", "tag": "", "data": "folder", "model": "ViT-B-16", "split": "test",
                 "kind": "id", "acc": 0.25, "ece": 0.2, "nll": 2.0, "seed": 0})  # a row written before top-5 existed
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate.main(["table", str(tmp_path / "results.jsonl"), "--format", "json"])
    recs = json.loads(capsys.readouterr().out)
    assert [(r["split"], r["clip_benchmark"]) for r in recs] == [
        ("val", "imagenet1k"), ("imagenet-v2", "imagenetv2"), ("imagenet-sketch", "imagenet_sketch"), ("objectnet", "objectnet"),
        ("test", "")]
    val = recs[0]
    assert (val["name"], val["runs"], val["run_dirs"], val["config"]) == ("ft [imagenet, ViT-B-16]", 2, ["runs/ft-s0", "runs/ft-s1"], rows[0]["config"])
    assert val["acc1"] == pytest.approx(0.6) and val["acc5"] == pytest.approx(0.8) and val["mean_per_class_recall"] == pytest.approx(0.5)
    assert val["acc1_std"] == pytest.approx(0.1414, abs=1e-4) and val["ece_std"] == pytest.approx(0.0)
    assert recs[-1]["acc5"] is None and recs[-1]["acc1_std"] is None and recs[-1]["acc1"] == 0.25
    evaluate.main(["table", str(tmp_path / "results.jsonl"), "--format", "csv"])
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(table) == 5 and table[0]["config.lr"] == "1e-05" and table[0]["run_dirs"] == "runs/ft-s0;runs/ft-s1"
    assert table[2]["clip_benchmark"] == "imagenet_sketch" and float(table[2]["acc5"]) == pytest.approx(0.8)
    assert table[-1]["config.lr"] == "" and table[-1]["acc5"] == ""
    evaluate.main(["table", str(tmp_path / "results.jsonl")])  # markdown as before: no top-5 / recall columns
    assert "top5" not in capsys.readouterr().out
