"""--report-to: every line train() writes to log.jsonl (loss terms, learning rate, held-out accuracy,
throughput) also goes to TensorBoard (RUN/tensorboard/) and/or Weights & Biases. Both packages are
optional: imported only when asked for, and asking for one that is not installed stops before anything
runs. Only the main process writes; a resumed run purges the steps it redoes (TensorBoard's purge_step,
W&B's run of the same id)."""
import hashlib
from pathlib import Path

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> the pip package it needs
WANDB_PROJECT = "robust-ft"  # the W&B project runs are logged to (its WANDB_PROJECT variable overrides it)


def reporters(report_to: str) -> list:
    """The names in --report-to, checked: known, and their package importable (else one SystemExit)."""
    import importlib.util

    names = [n for n in report_to.split(",") if n and n != "none"]
    if unknown := [n for n in names if n not in REPORTERS]:
        raise SystemExit(f"error: --report-to {report_to!r}: unknown {', '.join(unknown)} (none | tensorboard | wandb | "
                         "tensorboard,wandb)")
    if missing := [REPORTERS[n] for n in names if importlib.util.find_spec(REPORTERS[n]) is None]:
        raise SystemExit(f"error: --report-to {report_to} needs {', '.join(missing)}, which is not installed: "
                         f"pip install {' '.join(missing)}")
    return names


class Trackers:
    """The writers of one run, opened at step `start` (0, or the checkpoint a resume starts from)."""

    def __init__(self, report_to: str, run: Path, config: dict, start: int):
        names = reporters(report_to)
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=start + 1 if start else None)
        if "wandb" in names:
            import os

            import wandb

            run_id = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:16]  # the run folder's: a resume continues it
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run.name, id=run_id,
                                    dir=str(run), config=config, resume="allow")

    def log(self, record: dict):
        """One log.jsonl line: {"step": N, name: value, ...}."""
        values = {k: v for k, v in record.items() if k != "step"}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(values, step=record["step"])

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
