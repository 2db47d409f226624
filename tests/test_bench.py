"""bench/ scripts end to end on micro configs (they print their table and write nothing): the numbers
they measure are machine-dependent, so these check the plumbing and the table's shape."""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_step_time_micro_table_has_every_method_and_the_floors(tmp_path, tiny_model, capsys, monkeypatch):
    import step_time

    monkeypatch.chdir(tmp_path)
    methods = "ft,lp,ema,l2sp,kd,featkd,flyp,lora,car_ft,lipsum_ft,arf,carot"  # ARF reads --fake-data's captions and pool
    step_time.main(["--fake-data", "32", "--model", tiny_model, "--batch-size", "4", "--rounds", "2", "--steps", "1",
                    "--methods", methods, "--no-write"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(methods.split(",")) <= set(rows)
    assert rows["ft"][3].strip() == "1.00"  # ratio of FT to itself
    assert rows["kd"][5].strip() and not rows["ema"][5].strip()  # the θ0-forward floor stands beside teachers only
    assert float(rows["kd"][5]) > 1.0
    assert float(rows["arf"][5]) > 0  # ARF's design floor: both towers on its images and texts
    assert float(rows["carot"][5]) > float(rows["flyp"][3])  # FLYP's step + the EMA teacher's forward
    assert 0 < float(rows["lora"][5])  # forward + backward to the input of the frozen image tower
    assert "θ0 image forward alone" in out and "generated 32 px images" in out


def test_eval_speed_micro_agrees_with_bare_loop(tmp_path, folder_data, tiny_model, capsys, monkeypatch):
    import eval_speed

    monkeypatch.chdir(tmp_path)
    eval_speed.main(["--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--batch-size", "4",
                     "--rounds", "1", "--no-write"])  # raises if the two loops disagree on accuracy
    out = capsys.readouterr().out
    assert "| bare open_clip loop |" in out and "| common.evaluate_split |" in out


def test_retrieval_micro_exact_index_has_recall_one(capsys):
    import retrieval

    retrieval.main(["--n", "3000", "--d", "32", "--queries", "50", "--threads", "1", "--no-write"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3,000") or line.startswith("| 3000"))
    assert "1.000" in row  # below EXACT_MAX arf.build_index is exact: recall@10 vs torch's exact search is 1


def test_grad_checkpointing_micro_table_has_both_configurations(tiny_model, capsys):
    import grad_checkpointing

    grad_checkpointing.main(["--model", tiny_model, "--batch-size", "2", "--rounds", "1", "--no-write"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| o")]
    assert [r[1].strip() for r in rows] == ["off", "on"] and rows[0][3].strip() == "1.00"
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)


def test_data_speed_micro_has_both_tables_and_the_sweeps_agree(capsys):
    import data_speed

    data_speed.main(["--images", "4", "--alphas", "2", "--rounds", "1", "--batch-size", "2", "--threads", "1", "--no-write"])
    out = capsys.readouterr().out  # raises above if the two sweeps' logits disagree
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert float(rows["train (RandomResizedCrop 0.08-1 + flip)"][2]) > 0 and int(rows["eval (resize + centre crop)"][3]) >= 1
    assert rows["one pass per α (before)"][3].strip() == "1.00" and "4 generated JPEGs (500x375" in out
