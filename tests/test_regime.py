"""reproduce/regime.py end to end on a micro config (a generated folder, the tiny CLIP, 2 steps): a row per K,
the bars, the figure; a rerun trains nothing; a K read from other runs folders (--from); a K larger than a class
stops before any job; sweep.py at a K refuses an FT reference at another K and trains on the reference's shots."""
import re
import sys

import pytest

from conftest import COLOURS, REPO, stable_seed, write_images

sys.path.insert(0, str(REPO / "reproduce"))


@pytest.fixture(scope="module")
def micro(tmp_path_factory, tiny_model) -> str:
    """--extra of the micro config: a --data folder (conftest's folder_data layout), the tiny CLIP from one
    shared init file (WiSE-FT needs θ0)."""
    import open_clip
    import torch

    import common

    root = tmp_path_factory.mktemp("regime")
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(root / "folder" / split / name, n, seed=stable_seed(split, k), colour=COLOURS[k])
    weights = root / "tiny-init.pt"
    common.resolve_model(tiny_model)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-vit").state_dict(), weights)
    return (f"--data folder --data-root {root / 'folder'} --model {tiny_model} --pretrained {weights} --steps 2 "
            "--batch-size 8 --eval-every 0 --ckpt-every 0")


@pytest.fixture(scope="module")
def regime_map(tmp_path_factory, micro):
    """(argv, result, folder) of the map at K = 2 and the full set, 2 seeds, zero-shot, FT and Lipsum-FT."""
    import regime

    folder = tmp_path_factory.mktemp("map")
    argv = ["--shots", "2,0", "--seeds", "0,1", "--methods", "zeroshot,ft,lipsum_ft", "--extra", micro,
            "--runs", str(folder / "runs"), "--out", str(folder / "map.md"), "--figures", str(folder / "fig"),
            "--wise-alphas", "0,0.5,1"]
    return argv, regime.main(argv), folder


def test_regime_map_micro(regime_map):
    import regime

    _, result, folder = regime_map
    runs = folder / "runs"
    assert set(result) == {2, 0} and set(result[2]["methods"]) == {"lipsum_ft"}
    assert '"shots": 2' in (runs / "k2" / "ft-s1" / "args.json").read_text()
    assert '"shots": 0' in (runs / "full" / "ft-s1" / "args.json").read_text()
    report = (folder / "map.md").read_text()
    ft_table = report.split("## FT against zero-shot")[1].split("## Each method")[0]
    assert "\n| 2 |" in ft_table and "\n| full (" in ft_table and len(re.findall(r"α [\d.]+: [+-]", ft_table)) == 4  # per K, seed
    methods = report.split("## Each method")[1].split("## Issue #32's bars")[0]
    assert "| 2 | lipsum_ft (lam=1) | " in methods and "| full (" in methods and "SE" in methods  # with its coefficient
    bars = report.split("## Issue #32's bars per K")[1]
    assert "\n| 2 |" in bars and "\n| full (" in bars and "FT ID ≥ ZS + 7" in bars  # 2 steps: FT learns nothing
    assert "not measurable here: FT ZS transfer" in bars  # a folder without --zeroshot-data has no transfer split
    assert [name for name, _ in regime.bars(result[2])][-1] == "lipsum_ft ΔID ≥ −1, ΔOOD ≥ +3"
    assert (folder / "fig" / "regime_map.png").stat().st_size > 10_000 and "](fig/regime_map.png)" in report


def test_regime_rerun_and_from(regime_map):
    import regime

    argv, result, folder = regime_map
    runs = folder / "runs"
    done = sorted(p.name for p in (runs / ".done").iterdir())
    stamp = (runs / "k2" / "lipsum_ft-s0" / "final.pt").stat().st_mtime_ns
    regime.main(argv)  # a rerun trains nothing: the .done markers and the weights are the first invocation's
    assert sorted(p.name for p in (runs / ".done").iterdir()) == done and len(done) == 2 + 2 * 2 * 3
    assert (runs / "k2" / "lipsum_ft-s0" / "final.pt").stat().st_mtime_ns == stamp
    # a job stopped after training, while scoring per image (no .done, no correct-*.npy): the rerun scores, trains nothing
    (runs / ".done" / "lipsum_ft-k2-s0").unlink()
    for f in (runs / "k2" / "lipsum_ft-s0").glob("correct-*.npy"):
        f.unlink()
    regime.main(argv)
    assert (runs / ".done" / "lipsum_ft-k2-s0").exists() and (runs / "k2" / "lipsum_ft-s0" / "correct-test.npy").exists()
    assert (runs / "k2" / "lipsum_ft-s0" / "final.pt").stat().st_mtime_ns == stamp
    # a K read from other runs folders (reproduce.py's): each gives the one K its runs were trained at
    again = regime.main([*argv, "--from", f"{runs / 'full'},{runs / 'k2'}"])
    assert again[0]["methods"]["lipsum_ft"][0]["ood"] == result[0]["methods"]["lipsum_ft"][0]["ood"]
    assert again[2]["methods"]["lipsum_ft"][0]["id"] == result[2]["methods"]["lipsum_ft"][0]["id"]
    with pytest.raises(SystemExit, match=r"--from .*full: its runs were trained at --shots 0; .* must be in --shots \(2\)"):
        regime.main([*argv[:1], "2", *argv[2:], "--from", str(runs / "full")])
    with pytest.raises(SystemExit, match=r"--from .*k2: .* in no other --from folder"):
        regime.main([*argv, "--from", f"{runs / 'k2'},{runs / 'k2'}"])
    with pytest.raises(SystemExit, match=r"--from .*zeroshot lacks finished runs of the map \(ft-s0"):
        regime.main([*argv, "--from", str(runs / "zeroshot")])


def test_sweep_trains_at_the_recipes_shots_unless_told():
    """sweep.py's K (its runs' folder names, the FT reference it accepts) is what the runs train at: miniworld's
    recipe K = 10 when --extra names none, 0 on a folder."""
    import sweep

    assert sweep.shots_of([]) == 10 and sweep.shots_of(["--shots", "0"]) == 0
    assert sweep.shots_of(["--data", "folder", "--data-root", "x"]) == 0 and sweep.shots_of(["--data", "folder", "--shots", "3"]) == 3
    with pytest.raises(SystemExit, match="imagnet"):  # a typo in --data is one message, not a KeyError
        sweep.shots_of(["--data", "imagnet"])


def test_sweep_at_k(regime_map, micro, tmp_path):
    """sweep.py at K = 2: an FT reference at the full set is refused; against the map's RUNS/k2 it trains on the
    same shots (λ = 0 is FT: the same weights as the reference's FT)."""
    import torch

    import sweep

    runs = regime_map[2] / "runs"
    argv = ["lipsum_ft", "--flag", "lam", "--values", "0,1", "--seeds", "0,1", "--runs", str(tmp_path / "sweep"),
            "--out", str(tmp_path / "sweep.md"), "--extra", micro + " --shots 2"]
    with pytest.raises(SystemExit, match=r"trains with --shots 2 but its FT reference .*full.* --shots 0"):
        sweep.main([*argv, "--ref", str(runs / "full")])
    assert not (tmp_path / "sweep" / ".done").exists()  # refused before any run
    sweep.main([*argv, "--ref", str(runs / "k2")])
    assert '"shots": 2' in (tmp_path / "sweep" / "lipsum_ft-k2-lam1-s0" / "args.json").read_text()
    assert "at K = 2 training images per class" in (tmp_path / "sweep.md").read_text()
    ft = torch.load(runs / "k2" / "ft-s0" / "final.pt", weights_only=False)["model"]
    lam0 = torch.load(tmp_path / "sweep" / "lipsum_ft-k2-lam0-s0" / "final.pt", weights_only=False)["model"]
    assert all(torch.allclose(ft[k].float(), lam0[k].float(), atol=1e-6) for k in ft)


def test_regime_refuses_a_k_larger_than_a_class(tmp_path, micro):
    import regime

    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"^error: --shots 50 needs 50 training images per class .* choose --shots \d+ or fewer"):
        regime.main(["--shots", "2,50", "--seeds", "0", "--methods", "ft", "--extra", micro, "--runs", str(runs)])
    assert not runs.exists()  # stopped before any job
    with pytest.raises(SystemExit, match="may not hold --shots"):
        regime.main(["--shots", "2", "--extra", micro + " --shots 3", "--runs", str(runs)])
