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


@pytest.mark.parametrize("command, flags", [("eval", ["--ckpt", "--data", "--model", "--pretrained", "--seed"]),
                                            ("table", ["results"]), ("plot", ["results", "--out"])])
def test_every_subcommand_has_its_own_help(tmp_path, command, flags):
    out = run_script([str(REPO / "evaluate.py"), command, "--help"], cwd=tmp_path).stdout
    assert out.startswith(f"usage: evaluate.py {command}") and all(f in out for f in flags)
    top = run_script([str(REPO / "evaluate.py"), "--help"], cwd=tmp_path).stdout
    assert all(c in top for c in ("eval", "table", "plot"))


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
