"""reproduce/regime.py end to end on a micro config (a generated folder, the tiny CLIP, 2 steps): a row per K,
the bars, the figure; a rerun trains nothing; a K larger than a class stops before any job; sweep.py at a K
refuses an FT reference at another K and runs at the same K."""
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "reproduce"))


@pytest.fixture
def micro(tmp_path, folder_data, tiny_model, monkeypatch):
    """--extra of the micro config: --data folder, the tiny CLIP from one shared init file (WiSE-FT needs θ0)."""
    import open_clip
    import torch

    import common

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "tiny-init.pt"
    common.resolve_model(tiny_model)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-vit").state_dict(), weights)
    return (f"--data folder --data-root {folder_data} --model {tiny_model} --pretrained {weights} --steps 2 "
            "--batch-size 8 --eval-every 0 --ckpt-every 0")


def test_regime_map_micro(tmp_path, micro):
    import regime

    runs = tmp_path / "runs"
    argv = ["--shots", "2,0", "--seeds", "0,1", "--methods", "zeroshot,ft,lipsum_ft", "--extra", micro, "--runs", str(runs),
            "--out", str(tmp_path / "map.md"), "--figures", str(tmp_path / "fig"), "--wise-alphas", "0,0.5,1"]
    result = regime.main(argv)
    assert set(result) == {2, 0} and set(result[2]["methods"]) == {"lipsum_ft"}
    args = (runs / "k2" / "ft-s1" / "args.json").read_text()
    assert '"shots": 2' in args and '"shots": 0' in (runs / "full" / "ft-s1" / "args.json").read_text()
    report = (tmp_path / "map.md").read_text()
    ft_table = report.split("## FT against zero-shot")[1].split("## Each method")[0]
    assert "\n| 2 |" in ft_table and "\n| full (" in ft_table and len(re.findall(r"α [\d.]+: [+-]", ft_table)) == 4  # per K, seed
    methods = report.split("## Each method")[1].split("## Issue #32's bars")[0]
    assert "| 2 | lipsum_ft | " in methods and "| full (" in methods and "SE" in methods
    bars = report.split("## Issue #32's bars per K")[1]
    assert "\n| 2 |" in bars and "\n| full (" in bars and "FT ID ≥ ZS + 7" in bars  # 2 steps: FT learns nothing
    assert "not measurable here: FT ZS transfer" in bars  # a folder without --zeroshot-data has no transfer split
    assert [name for name, _ in regime.bars(result[2])][-1] == "lipsum_ft ΔID ≥ −1, ΔOOD ≥ +3"
    assert (tmp_path / "fig" / "regime_map.png").stat().st_size > 10_000 and "](fig/regime_map.png)" in report
    # a rerun trains nothing: the .done markers and the runs' weights are those of the first invocation
    done = sorted(p.name for p in (runs / ".done").iterdir())
    stamp = (runs / "k2" / "lipsum_ft-s0" / "final.pt").stat().st_mtime_ns
    regime.main(argv)
    assert sorted(p.name for p in (runs / ".done").iterdir()) == done and len(done) == 2 + 2 * 2 * 3
    assert (runs / "k2" / "lipsum_ft-s0" / "final.pt").stat().st_mtime_ns == stamp

    # sweep.py at K = 2: a reference at the full set is refused; the map's RUNS/k2 is the reference at K = 2
    import sweep

    sweep_argv = ["lipsum_ft", "--flag", "lam", "--values", "0,1", "--seeds", "0,1", "--runs", str(tmp_path / "sweep"),
                  "--out", str(tmp_path / "sweep.md")]
    with pytest.raises(SystemExit, match=r"trains with --shots 2 but its FT reference .*full.* --shots 0"):
        sweep.main([*sweep_argv, "--extra", micro + " --shots 2", "--ref", str(runs / "full")])
    assert not (tmp_path / "sweep" / ".done").exists()  # refused before any run
    sweep.main([*sweep_argv, "--extra", micro + " --shots 2", "--ref", str(runs / "k2")])
    assert '"shots": 2' in (tmp_path / "sweep" / "lipsum_ft-k2-lam1-s0" / "args.json").read_text()
    assert "at K = 2 training images per class" in (tmp_path / "sweep.md").read_text()


def test_regime_refuses_a_k_larger_than_a_class(tmp_path, micro):
    import regime

    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"^error: --shots 50 needs 50 training images per class .* choose --shots \d+ or fewer"):
        regime.main(["--shots", "2,50", "--seeds", "0", "--methods", "ft", "--extra", micro, "--runs", str(runs)])
    assert not runs.exists()  # stopped before any job
    with pytest.raises(SystemExit, match="may not hold --shots"):
        regime.main(["--shots", "2", "--extra", micro + " --shots 3", "--runs", str(runs)])
