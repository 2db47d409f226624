"""evaluate.py: `eval` of a run and of a zero-shot model, `table` and `plot` from results.jsonl, and each
subcommand's own --help."""
import json

import pytest

from conftest import REPO, run_script


def test_baselines_ft_end_to_end_and_table(tmp_path, folder_data, tiny_model):
    out = tmp_path / "runs" / "ft"
    run_script([str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", folder_data,
                "--model", tiny_model, "--steps", "4", "--batch-size", "8", "--eval-every", "2", "--out", str(out)], cwd=tmp_path)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"test", "sketch"}
    for r in rows:
        assert {"method", "data", "model", "split", "acc", "ece", "nll", "seed", "commit", "step"} <= set(r)
        assert r["method"] == "ft" and r["n"] == 16
    assert (out / "args.json").exists() and (out / "final.pt").exists()
    table = run_script([str(REPO / "evaluate.py"), "table", str(tmp_path / "runs" / "results.jsonl")], cwd=tmp_path).stdout
    assert "| ft | 1 |" in table and "OOD mean" in table
    again = run_script([str(REPO / "evaluate.py"), "eval", "--ckpt", str(out)], cwd=tmp_path).stdout
    acc_test = next(r["acc"] for r in rows if r["split"] == "test")
    assert f"acc {100*acc_test:6.2f}" in again
    plot = tmp_path / "p.png"
    run_script([str(REPO / "evaluate.py"), "plot", str(tmp_path / "runs" / "results.jsonl"), "--out", str(plot)], cwd=tmp_path)
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("command, flags", [("eval", ["--ckpt", "--data", "--model", "--pretrained", "--seed",
                                                      "--test-domain"]),
                                            ("table", ["results", "--domainbed", "--format"]), ("plot", ["results", "--out"]),
                                            ("export", ["run", "--out", "--alpha"]), ("curves", ["runs", "--out"]),
                                            ("import", ["checkpoint", "--head", "--model", "--pretrained", "--data", "--out"])])
def test_every_subcommand_has_its_own_help(tmp_path, command, flags):
    out = run_script([str(REPO / "evaluate.py"), command, "--help"], cwd=tmp_path).stdout
    assert out.startswith(f"usage: evaluate.py {command}") and all(f in out for f in flags)
    top = run_script([str(REPO / "evaluate.py"), "--help"], cwd=tmp_path).stdout
    assert all(c in top for c in ("eval", "table", "plot", "export", "import", "curves"))


def test_zero_shot_eval_equals_the_zeroshot_baseline(tmp_path, folder_data, tiny_model):
    micro = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model]
    run_script([str(REPO / "evaluate.py"), "eval", *micro, "--out", str(tmp_path / "a")], cwd=tmp_path)
    run_script([str(REPO / "baselines.py"), "--method", "zeroshot", *micro, "--out", str(tmp_path / "b")], cwd=tmp_path)
    rows = {d: {r["split"]: r["acc"] for r in map(json.loads, (tmp_path / d / "results.jsonl").read_text().splitlines())}
            for d in ("a", "b")}
    assert rows["a"] == rows["b"] and set(rows["a"]) == {"test", "sketch"}


def test_table_and_plot_keep_data_and_model_apart_and_skip_garbage_lines(tmp_path):
    rows = [{"run": f"runs/ft-{data}", "method": "ft", "tag": "", "data": data, "model": model, "split": split,
             "kind": kind, "acc": acc, "ece": 0.1, "nll": 1.0, "seed": 0}
            for data, model, acc in (("folder", "ViT-B-16", 0.5), ("miniworld", "miniclip", 0.9))
            for split, kind in (("id", "id"), ("sketch", "ood"))]
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, "this is not json")
    lines.insert(3, json.dumps({"run": "r", "method": "ft"}))  # a row without split
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    out = run_script([str(REPO / "evaluate.py"), "table", str(tmp_path / "results.jsonl")], cwd=tmp_path).stdout
    assert "skipped 2 malformed line(s)" in out and "line 2, 4" in out
    assert "| ft [folder, ViT-B-16] | 1 | 50.0 | 50.0 |" in out and "| ft [miniworld, miniclip] | 1 | 90.0 | 90.0 |" in out
    out = run_script([str(REPO / "evaluate.py"), "plot", str(tmp_path / "results.jsonl"), "--out", "p.png"], cwd=tmp_path).stdout
    for name in ("p-folder-ViT-B-16.png", "p-miniworld-miniclip.png"):  # one figure per (data, model)
        assert (tmp_path / name).stat().st_size > 1000 and f"wrote {name}" in out
    assert "2 figure(s): p-folder-ViT-B-16.png, p-miniworld-miniclip.png" in out
    proc = run_script([str(REPO / "evaluate.py"), "plot", str(tmp_path), "--out", "q.png", "--methods", "lp"], cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "no rows of --methods lp" in proc.stderr and "Traceback" not in proc.stderr


def test_table_rows_are_configurations_named_by_what_differs_and_count_seeds(tmp_path, folder_data, tiny_model):
    """Runs that differ in lr are two rows (named by the lr), not two "seeds" of one; a second seed joins its
    configuration's row; two runs of one configuration and seed are named in a warning."""
    base = [str(REPO / "baselines.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
            "--steps", "1", "--batch-size", "8", "--eval-every", "0"]
    for out, extra in (("a", ["--lr", "1e-5"]), ("b", ["--lr", "3e-5"]), ("c", ["--lr", "1e-5"]),
                       ("d", ["--lr", "1e-5", "--seed", "1"])):
        run_script([*base, *extra, "--out", f"runs/{out}"], cwd=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert all(r["config"]["lr"] in (1e-5, 3e-5) and "seed" not in r["config"] and "out" not in r["config"] for r in rows)
    assert len({r["config_id"] for r in rows}) == 2
    out = run_script([str(REPO / "evaluate.py"), "table", "runs"], cwd=tmp_path).stdout
    table = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| ft")}
    assert table == {"ft (lr=1e-05)": "2", "ft (lr=3e-05)": "1"}, out
    assert "warning: runs/a and runs/c have one configuration and seed (0)" in out


def test_plot_for_many_series_keeps_the_legend_off_the_axes_with_a_colour_per_family(tmp_path, monkeypatch):
    """27 series (the reproduction's count) used to bury the axes under the legend, with colours repeating:
    the legend sits outside the axes, a family's variants share its colour with their own markers, and
    --methods draws a subset."""
    import matplotlib.figure

    import common

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    methods = ["ft", "lp", "kd", "ema", "l2sp", "featkd", "flyp", "car_ft", "lipsum_ft", "arf", "scratch", "lpft"]
    points = [(f"{m} (v{v})" if v else m, 60 + i + v, 45 + v, 0.1, 0.1) for i, m in enumerate(methods) for v in range(2)]
    curves = {f"WiSE-FT on {m}": [(a, 60 + 10 * a, 48 - a) for a in (0, 0.5, 0.8, 1)] for m in ("ft", "lipsum_ft", "arf")}
    common.plot_id_vs_ood(points, curves, str(tmp_path / "p.png"))
    fig = saved[0]
    ax, legend = fig.axes[0], fig.axes[0].get_legend()
    fig.canvas.draw()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes, not over them
    colours, markers = {}, {}
    for bars in ax.containers:  # one errorbar container per point
        colours.setdefault(bars.get_label().split(" ")[0], set()).add(bars.lines[0].get_color())
        markers.setdefault(bars.get_label().split(" ")[0], []).append(bars.lines[0].get_marker())
    assert len(colours) == len(methods) and all(len(c) == 1 for c in colours.values())
    assert len({c.pop() for c in colours.values()}) == len(methods)  # no two families share a colour
    assert all(len(set(m)) == 2 for m in markers.values())  # a family's variants differ by marker
    annotated = [t.get_text() for t in ax.texts]
    assert annotated.count("α=0.5") == 3 and annotated.count("α=0.8") == 3


def test_table_takes_a_folder_and_an_empty_results_file_is_one_message(tmp_path):
    """A runs root or run folder holds its results.jsonl; an empty one (or a missing one) stops with one
    message and a non-zero exit, not a malformed table."""
    run = tmp_path / "runs" / "ft-s0"
    run.mkdir(parents=True)
    row = {"run": str(run), "method": "ft", "tag": "", "data": "folder", "model": "m", "split": "test", "kind": "id",
           "acc": 0.25, "ece": 0.1, "nll": 1.0, "seed": 0}
    for folder in (run, run.parent):
        (folder / "results.jsonl").write_text(json.dumps(row) + "\n")
        out = run_script([str(REPO / "evaluate.py"), "table", str(folder)], cwd=tmp_path).stdout
        assert "| ft | 1 | 25.0 |" in out
    (run / "results.jsonl").write_text("")
    for argv, message in ((["table", str(run)], "holds no results rows: nothing to tabulate"),
                          (["plot", str(run / "results.jsonl")], "holds no results rows: nothing to plot"),
                          (["table", str(tmp_path / "nowhere")], "does not exist")):
        proc = run_script([str(REPO / "evaluate.py"), *argv], cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1000:]


def make_zeroshot_folder(root, names=True, templates=True):
    """A second dataset, never trained on: 3 classes of generated PNGs (one folder empty, so dropped),
    with its own classnames.txt and templates.txt."""
    from conftest import write_images

    for k, folder in enumerate(["c0", "c1", "c2"]):
        write_images(root / folder, 3, seed=50 + k, fmt="PNG", colour=[(0, 200, 200), (200, 0, 200), (90, 90, 90)][k])
    (root / "c3").mkdir()
    if names:
        (root / "classnames.txt").write_text("teal bird\nmagenta fish\ngrey horse\nempty one\n")
    if templates:
        (root / "templates.txt").write_text("a photo of a {}.\nan image of the {}.\n")
    return root


def test_zeroshot_data_rows_use_the_runs_own_text_tower(tmp_path, folder_data, tiny_model):
    """--zeroshot-data on a method file and on `evaluate.py eval`: kind="zeroshot" rows of a dataset the
    run never saw, scored with a head from the run's *current* text tower: FT's text tower is θ0's, so its
    head is θ0's; FLYP's text tower trained, so its head (and its rows) differ from θ0's head."""
    import torch
    import torch.nn.functional as F

    import common

    zs = make_zeroshot_folder(tmp_path / "pets")
    micro = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "3", "--batch-size", "8",
             "--lr", "1e-3", "--eval-every", "0", "--zeroshot-data", str(zs)]
    rows, models = {}, {}
    for method in ("ft", "flyp"):
        out = tmp_path / "runs" / method
        proc = run_script([str(REPO / "baselines.py"), "--method", method, *micro, "--out", str(out)], cwd=tmp_path)
        assert "Traceback" not in proc.stdout + proc.stderr and "dropping 1 class(es) with no images" in proc.stdout
        rows[method] = next(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"pets"' in line)
        assert rows[method]["kind"] == "zeroshot" and rows[method]["n"] == 9
        run = common.load_run(out, "cpu")
        split = next(s for s in run.task.tests if s.name == "pets")
        assert split.classnames == ["teal bird", "magenta fish", "grey horse"] and split.templates[1] == "an image of the {}."
        theta0 = common.run_theta0(run, "cpu")
        head_now = common.zeroshot_head(run.model.clip, run.model.tokenizer, split.classnames, split.templates)  # [3, D]
        head0 = common.zeroshot_head(theta0.clip, theta0.tokenizer, split.classnames, split.templates)
        feats, labels, _ = common.predict(lambda x: F.normalize(run.model.clip.encode_image(x), dim=-1), split.images,
                                          run.eval_tf, torch.device("cpu"))
        for head, name in ((head_now, "own"), (head0, "theta0")):
            logits = common.cosine_logits(feats, head, run.model.scale.detach())  # [9, 3]
            models[(method, name)] = common.classification_metrics(logits, labels)
        assert rows[method]["nll"] == pytest.approx(models[(method, "own")]["nll"], abs=1e-5)
        again = run_script([str(REPO / "evaluate.py"), "eval", "--ckpt", str(out)], cwd=tmp_path).stdout
        assert f"pets             zeroshot  acc {100 * rows[method]['acc']:6.2f}" in again
        last = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"pets"' in line][-1]
        assert last["nll"] == pytest.approx(rows[method]["nll"], abs=1e-6)
        if method == "ft":  # frozen text tower: the head of the current tower is θ0's
            assert torch.allclose(head_now, head0, atol=1e-6)
        else:
            assert not torch.allclose(head_now, head0, atol=1e-3)
            assert abs(models[(method, "own")]["nll"] - models[(method, "theta0")]["nll"]) > 1e-4
    # evaluate.py eval --zeroshot-data on a run trained without it, and on the zero-shot model
    other = make_zeroshot_folder(tmp_path / "plain", names=False, templates=False)  # folder names, simple templates
    out = run_script([str(REPO / "evaluate.py"), "eval", "--ckpt", str(tmp_path / "runs" / "ft"), "--zeroshot-data",
                      f"{other}"], cwd=tmp_path).stdout
    assert "plain            zeroshot" in out and "pets" not in out
    out = run_script([str(REPO / "evaluate.py"), "eval", "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
                      "--zeroshot-data", f"{zs},{other}", "--out", str(tmp_path / "runs" / "zs")], cwd=tmp_path).stdout
    assert "pets             zeroshot" in out and "plain            zeroshot" in out
    table = run_script([str(REPO / "evaluate.py"), "table", str(tmp_path / "runs" / "results.jsonl")], cwd=tmp_path).stdout
    assert "ZS mean" in table and "pets" in table


@pytest.mark.parametrize("setup_folder, message", [
    (lambda d: d.mkdir(), "no images under"),
    (lambda d: (make_zeroshot_folder(d), (d / "templates.txt").write_text("a photo\n")), "needs one {} for the class name"),
    (lambda d: (make_zeroshot_folder(d), (d / "classnames.txt").write_text("one\ntwo\n")), "2 names for 4 class folders"),
    (lambda d: None, "is not a folder")])
def test_bad_zeroshot_folder_gives_one_message(tmp_path, folder_data, tiny_model, setup_folder, message):
    folder = tmp_path / "zs"
    setup_folder(folder)
    proc = run_script([str(REPO / "baselines.py"), "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
                       "--zeroshot-data", str(folder), "--out", str(tmp_path / "run")], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_workers_one_rule_for_every_script(monkeypatch, capsys):
    """--workers N is N (at most the cores); the default (-1) is the free cores per process less one on CUDA,
    none on CPU (the model's threads use the cores); below -1 is one message, from evaluate.py as from setup."""
    import common
    import evaluate

    monkeypatch.setattr(common, "free_cores", lambda: 16.0)
    cuda, cpu = common.torch.device("cuda"), common.torch.device("cpu")
    assert common.data_workers(3, cpu) == min(3, len(common.process_cpus()))
    assert common.data_workers(common.AUTO_WORKERS, cpu) == 0 and common.data_workers(common.AUTO_WORKERS, cuda) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert common.data_workers(-1, cuda) == 3 and "DataLoader workers: 3 per process" in capsys.readouterr().out
    assert common.TrainArgs.workers == common.AUTO_WORKERS and all("workers" not in r for r in common.FT_RECIPES.values())
    with pytest.raises(SystemExit, match="error: --workers must be >= 0"):
        evaluate.main(["eval", "--ckpt", "nowhere", "--workers", "-2", "--device", "cpu"])


def test_named_zeroshot_suite_is_scored_with_the_suites_names_and_templates(tmp_path, folder_data, tiny_model):
    """`baselines.py --method zeroshot --zeroshot-data eurosat=DIR`: a row named eurosat whose scores are those of
    the head built from clip_benchmark's EuroSAT names and templates (not the folder names, not the simple
    templates); `evaluate.py eval --ckpt` of the run rebuilds the same split from args.json."""
    import torch
    import torch.nn.functional as F

    import common
    from conftest import write_images
    from test_tasks import EUROSAT_FOLDERS

    for k, name in enumerate(EUROSAT_FOLDERS):
        write_images(tmp_path / "eurosat" / name, 2, seed=70 + k, colour=(25 * k, 200 - 20 * k, 90))
    out = tmp_path / "runs" / "zs"
    proc = run_script([str(REPO / "baselines.py"), "--method", "zeroshot", "--data", "folder", "--data-root", folder_data,
                       "--model", tiny_model, "--workers", "0", "--zeroshot-data", f"eurosat={tmp_path / 'eurosat'}",
                       "--out", str(out)], cwd=tmp_path)
    assert "AnnualCrop -> annual crop land" in proc.stdout
    row = next(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"eurosat"' in line)
    assert row["kind"] == "zeroshot" and row["n"] == 20
    run = common.load_run(out, "cpu")
    split = next(s for s in run.task.tests if s.name == "eurosat")
    assert split.classnames[0] == "annual crop land" and split.templates[0] == "a centered satellite photo of {}."
    feats, labels, _ = common.predict(lambda x: F.normalize(run.model.clip.encode_image(x), dim=-1), split.images,
                                      run.eval_tf, torch.device("cpu"))
    nll = {}
    for key, names, templates in (("suite", split.classnames, split.templates),
                                  ("folders", EUROSAT_FOLDERS, split.templates),
                                  ("simple", split.classnames, ["a photo of a {}."])):
        head = common.zeroshot_head(run.model.clip, run.model.tokenizer, names, templates)  # [10, D]
        nll[key] = common.classification_metrics(common.cosine_logits(feats, head, run.model.scale.detach()), labels)["nll"]
    assert row["nll"] == pytest.approx(nll["suite"], abs=1e-5)
    assert abs(nll["suite"] - nll["folders"]) > 1e-4 and abs(nll["suite"] - nll["simple"]) > 1e-4
    again = run_script([str(REPO / "evaluate.py"), "eval", "--ckpt", str(out)], cwd=tmp_path).stdout
    assert f"eurosat          zeroshot  acc {100 * row['acc']:6.2f}" in again


@pytest.mark.parametrize("suite, message", [("food", "unknown suite 'food'; known suites: caltech101, cars, cifar10,"),
                                            ("cifar10", "has 3 class folders but cifar10 has 10 classes")])
def test_bad_named_suite_gives_one_message(tmp_path, folder_data, tiny_model, suite, message):
    folder = make_zeroshot_folder(tmp_path / "zs")
    (folder / "c3").rmdir()
    proc = run_script([str(REPO / "evaluate.py"), "eval", "--data", "folder", "--data-root", folder_data, "--model", tiny_model,
                       "--zeroshot-data", f"{suite}={folder}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1000:]
    assert proc.stderr.count("error:") == 1


def test_domainbed_each_test_domain_end_to_end_and_the_average_is_the_mean_of_the_domains(tmp_path, tiny_model):
    """FT on each of the 4 left-out domains (default run names keep them apart); the table has a column per
    domain and their average, recomputed here by hand; `eval --ckpt` rebuilds the run's own task."""
    import numpy as np

    from conftest import PACS_DOMAINS, write_domain_tree

    root = write_domain_tree(tmp_path / "pacs", n=3)
    for domain in PACS_DOMAINS:
        run_script([str(REPO / "baselines.py"), "--method", "ft", "--data", "domainbed", "--data-root", root,
                    "--test-domain", domain, "--model", tiny_model, "--steps", "2", "--batch-size", "8", "--workers", "0"],
                   cwd=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert [(r["split"], r["kind"], r["n"]) for r in rows] == [(d, "ood", 6) for d in PACS_DOMAINS]
    assert [r["config"]["test_domain"] for r in rows] == list(PACS_DOMAINS) and rows[0]["config"]["select"] == "heldout"
    assert len({json.dumps({k: v for k, v in r["config"].items() if k != "test_domain"}) for r in rows}) == 1
    out = run_script([str(REPO / "evaluate.py"), "table", "--domainbed", "runs"], cwd=tmp_path).stdout
    assert f"**PACS** ({root})" in out and "| method | seeds | art_painting | cartoon | photo | sketch | Avg |" in out
    cells = next(line for line in out.splitlines() if line.startswith("| ft ")).strip("| ").split(" | ")
    accs = {r["split"]: 100 * r["acc"] for r in rows}
    assert cells == ["ft", "1", *(f"{accs[d]:.1f}" for d in PACS_DOMAINS), f"{np.mean(list(accs.values())):.1f}"]
    again = run_script([str(REPO / "evaluate.py"), "eval", "--ckpt", "runs/ft-domainbed-photo-tiny-vit-s0"],
                       cwd=tmp_path).stdout
    assert f"photo            ood       acc {accs['photo']:6.2f}" in again and "sketch" not in again
    run_script([str(REPO / "evaluate.py"), "eval", "--data", "domainbed", "--data-root", root, "--test-domain", "cartoon",
                "--model", tiny_model, "--workers", "0"], cwd=tmp_path)  # the zero-shot model: a row of its own
    out = run_script([str(REPO / "evaluate.py"), "table", "--domainbed", "runs"], cwd=tmp_path).stdout
    zeroshot = next(line for line in out.splitlines() if line.startswith("| zeroshot "))
    assert zeroshot.endswith("| incomplete (no art_painting, photo, sketch) |"), out


def test_domainbed_table_averages_seeds_per_domain_and_marks_a_row_missing_a_domain(tmp_path):
    """Per domain the mean over seeds; the average is the mean of those means; a configuration lacking a
    domain has no average; rows of other --data are left out."""
    def row(method, domain, seed, acc, lr=1e-5):
        config = {"data": "domainbed", "data_root": "/gone/PACS", "test_domain": domain, "lr": lr}
        return {"run": f"runs/{method}-{domain}-{lr}-s{seed}", "method": method, "data": "domainbed", "model": "m",
                "split": domain, "kind": "ood", "acc": acc, "seed": seed, "config": config, "config_id": f"{domain}{lr}"}
    accs = {"art_painting": (0.5, 0.7), "cartoon": (0.4, 0.4), "photo": (0.9, 0.8), "sketch": (0.2, 0.3)}
    rows = [row("ft", d, s, a) for d, pair in accs.items() for s, a in enumerate(pair)]
    rows += [row("ft", d, 0, 0.5, lr=3e-5) for d in ("art_painting", "photo")]
    rows.append({**row("ft", "photo", 0, 0.1), "data": "folder", "run": "runs/a-folder-run"})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_script([str(REPO / "evaluate.py"), "table", "--domainbed", "results.jsonl"], cwd=tmp_path).stdout
    lines = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in out.splitlines()
             if line.startswith("| ft")}
    per_domain = [100 * sum(pair) / 2 for pair in accs.values()]
    assert lines["ft (lr=1e-05)"][2:] == ["60.0 ± 14.1", "40.0 ± 0.0", "85.0 ± 7.1", "25.0 ± 7.1", f"{sum(per_domain) / 4:.1f}"]
    assert lines["ft (lr=3e-05)"][1:] == ["1", "50.0", "", "50.0", "", "incomplete (no cartoon, sketch)"], out
    assert "**PACS** (/gone/PACS)" in out  # the data root is gone: the domains are PACS's, recognised from the rows
    (tmp_path / "folder.jsonl").write_text(json.dumps(rows[-1]) + "\n")
    proc = run_script([str(REPO / "evaluate.py"), "table", "--domainbed", "folder.jsonl"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "error: no --data domainbed rows" in proc.stderr and "Traceback" not in proc.stderr
    domainbed = [r for r in rows if r["data"] == "domainbed"]  # the left-out domain is the only split: no ID axis
    (tmp_path / "db.jsonl").write_text("".join(json.dumps(r) + "\n" for r in domainbed))
    out = run_script([str(REPO / "evaluate.py"), "plot", "db.jsonl", "--out", "db.png"], cwd=tmp_path).stdout
    assert "no ID split" in out and not (tmp_path / "db.png").exists()
