"""reproduce/ end to end on a micro config: reproduce.py (every method, WiSE-FT, TPGM, soup, energy gaps,
and a RESULTS.md whose table has every row and whose numbers come from results.jsonl), sweep.py, diagnostics.py."""
import json
import re
import sys

import pytest

from conftest import REPO, write_images

sys.path.insert(0, str(REPO / "reproduce"))


def test_reproduce_micro_writes_every_row(tmp_path, folder_data, tiny_model, monkeypatch):
    import reproduce

    monkeypatch.chdir(tmp_path)
    captions = tmp_path / "captions.tsv"
    lines = [f"{p}\ta picture of a {p.parent.name.replace('_', ' ')}" for p in sorted((tmp_path / "folder" / "train").rglob("*.jpg"))]
    captions.write_text("\n".join(lines) + "\n")
    write_images(tmp_path / "pool" / "img", 12, seed=7)
    pool = tmp_path / "pool" / "pool.tsv"
    pool.write_text("filepath\ttitle\n" + "".join(f"img/img{i}.jpg\ta thing number {i}\n" for i in range(12)))
    import open_clip
    import torch

    import common

    weights = tmp_path / "tiny-init.pt"  # one shared initialisation for every seed, as soups require
    common.resolve_model(tiny_model)
    torch.manual_seed(0)  # the same random model whatever ran before in this process
    torch.save(open_clip.create_model("tiny-vit").state_dict(), weights)
    extra = f"--data folder --data-root {folder_data} --model {tiny_model} --pretrained {weights} --steps 2 --batch-size 8 --eval-every 0 --ckpt-every 0"
    argv = ["--seeds", "0,1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "RESULTS.md"),
            "--figures", str(tmp_path / "docs"), "--extra", extra, "--wise-alphas", "0,0.5,1", "--tpgm-steps", "3",
            "--arf-args", f"--captioner dataset --captions {captions} --pool {pool} --retrieve-k 2"]
    reproduce.main(argv)
    report = (tmp_path / "RESULTS.md").read_text()
    ablation_labels = [f"{method} ({'lam=1 ' if method == 'lipsum_ft' else ''}{tag})"  # "arf (no-cap)", "lipsum_ft (lam=1 kld)"
                       for method, tag in reproduce.ABLATIONS.values()]
    labels = [name for name, _, _ in reproduce.METHODS if name not in reproduce.ABLATIONS] + ablation_labels
    for label in labels:
        assert f"| {label}" in report, label
    assert "| ft (wise a=0.5) | 2 |" in report and "| lipsum_ft (wise a=0.5) | 2 |" in report
    assert "| ft (tpgm) | 2 |" in report and "soup" in report and "| lora (wise a=0.5) | 2 |" in report
    assert "| ft (stock) | 2 |" in report  # Model Stock of each FT seed with its partner, filed under that seed
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert not any("stock-partners" in r["run"] for r in rows)  # the partners are no FT rows, only members
    assert any("stock-partners" in m for r in rows for m in r.get("members", []))
    for method in ("flyp", "arf"):  # merges of the methods that classify with their text tower
        assert f"| {method} (wise a=0.5) | 2 |" in report and f"| {method} (tpgm) | 2 |" in report, method
    robust = report[report.index("## Effective robustness"):report.index("## Shape comparison")]
    for label in labels:  # every method paired with FT of the same seed, over both seeds
        assert f"| {label} | 2 |" in robust or f"| {label} (" in robust, label
    for label in ablation_labels:  # each ablation has its own energy gap (keyed by run, not method)
        gap = next(line for line in robust.splitlines() if line.startswith(f"| {label} |")).split("|")[7].strip()
        assert gap != "–", label
    assert "| ft | 2 | +0.0 ± 0.0 | +0.0 ± 0.0 |" in robust  # FT against itself (ΔID, ΔOOD)
    assert "Training set: the full training split" in report  # a folder: no --shots, every image
    claims = report.split("## The papers' ordering claims")[1]
    table3 = [line for line in claims.splitlines() if "beats its variant lipsum_ft (" in line]
    assert len(table3) == 3 and not any("not measured" in line for line in table3)  # the ablations' rows found by their words
    assert "| FT lowers zero-shot transfer | not measured (no such rows) |" in claims  # a folder has no transfer split
    bars = report[report.index("## The world's bars"):report.index("## Text-space diagnostics")]
    assert "| FT ID ≥ zero-shot + 7 |" in bars and re.search(r"FT's WiSE-FT bulge.*\| α (0|0\.5), (0|0\.5): ", bars)  # per seed
    for method in reproduce.BARS_ON:  # each against FT with its paired per-image SE
        line = next(line for line in bars.splitlines() if line.startswith((f"| {method}: ", f"| {method} (")))
        assert "SE" in line and "()" not in line, method  # an untagged method is named alone
    assert "## Text-space diagnostics" in report and "| ft | 2 |" in report.split("## Text-space diagnostics")[1]
    assert "Pearson r" in report and (tmp_path / "docs" / "reproduce_energy_gap.png").exists()
    assert (tmp_path / "docs" / "reproduce_id_vs_ood.png").exists()
    ft_test = [json.loads(line)["acc"] for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()
               if '"tag": ""' in line and '"method": "ft"' in line and '"split": "test"' in line]
    assert f"| ft | 2 | {100 * sum(ft_test) / len(ft_test):.1f}" in report  # the table is the jsonl's numbers
    # a rerun skips everything that is done
    done = sorted(p.name for p in (tmp_path / "runs" / ".done").iterdir())
    reproduce.main(argv)
    assert sorted(p.name for p in (tmp_path / "runs" / ".done").iterdir()) == done

    # reproduce/sweep.py on the same FT reference: λ = 0 is FT exactly, and the choice follows the held-out rule
    import sweep

    chosen = sweep.main(["lipsum_ft", "--flag", "lam", "--values", "0,1", "--seeds", "0,1", "--extra", extra,
                         "--runs", str(tmp_path / "sweep"), "--ref", str(tmp_path / "runs"), "--out", str(tmp_path / "sweep.md")])
    table = (tmp_path / "sweep.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and table.count("**yes**") == (chosen is not None)
    assert "| +0.0 (SE 0.0) | +0.0 ± 0.0 (SE 0.0) | +0.0 ± 0.0 (SE 0.0) |" in table.split("| 0 |")[1].split("\n")[0]
    held = {v: sum(sweep.heldout_acc(tmp_path / "sweep" / f"lipsum_ft-lam{v}-s{s}") for s in (0, 1)) / 2 for v in ("0", "1")}
    ft_held = sum(sweep.heldout_acc(tmp_path / "runs" / f"ft-s{s}") for s in (0, 1)) / 2
    assert chosen == max((v for v in held if held[v] >= ft_held - sweep.MAX_HELDOUT_DROP), key=float, default=None)
    ft_state = torch.load(tmp_path / "runs" / "ft-s0" / "final.pt", weights_only=False)["model"]
    lam0_state = torch.load(tmp_path / "sweep" / "lipsum_ft-lam0-s0" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(ft_state[k], lam0_state[k]) for k in ft_state)  # Lipsum-FT at λ = 0 is FT, bit for bit


def test_diagnostics_closed_forms_and_runs(tmp_path, folder_data, tiny_model, capsys):
    """Participation ratio and k90 of known spectra; on runs, FT against itself is 1 and LP (a frozen image
    tower) moves no feature."""
    import torch

    import baselines
    import diagnostics

    eye = torch.eye(8)
    for k in (1, 4, 8):  # rows spread evenly over k orthogonal directions: PR = k, and k90 = ceil(0.9 k)
        values, _ = diagnostics.spectrum(eye[:k].repeat(5, 1))
        assert diagnostics.participation(values) == (pytest.approx(k), -(-9 * k // 10))
    values, _ = diagnostics.spectrum(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 1.0, 0]]))
    assert diagnostics.participation(values)[0] == pytest.approx(1 / (0.25 ** 2 + 0.75 ** 2))  # (Σλ)²/Σλ², λ = (¾, ¼)
    micro = ["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "2", "--batch-size", "8",
             "--lr", "1e-3", "--eval-every", "0"]
    for method in ("ft", "lp"):
        baselines.main(["--method", method, *micro, "--out", str(tmp_path / "runs" / f"{method}-s0")])
    space, change = diagnostics.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "diag.md")])
    assert set(change) == {"ft", "lp"} and change["lp"][0][0] == 0.0 and change["ft"][0][0] > 0
    assert 0 < change["ft"][0][1] < 1 and 1 <= space["random"][0] <= space["dim"]
    table = (tmp_path / "diag.md").read_text()
    assert "| ft | 1 |" in table and table.split("| ft | 1 |")[1].split("\n")[0].strip().endswith("| 1 |")
    assert "| lp | 1 | 0 |" in table and "participation ratio" in table
