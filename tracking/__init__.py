"""Watching a run. --report-to: every line train() writes to log.jsonl (loss terms, learning rate, held-out
accuracy, throughput) also goes to TensorBoard (RUN/tensorboard/) and/or Weights & Biases. Both packages
are optional: imported only when asked for, and asking for one that is not installed stops before anything
runs. Only the main process writes; a resumed run purges the steps it redoes (TensorBoard's purge_step,
W&B's run of the same id). plot_curves: the figure of `evaluate.py curves` from log.jsonl lines."""
import hashlib
from pathlib import Path

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> the pip package it needs
NOT_DRAWN = ("step", "lr", "grad_norm", "images_per_s")  # log.jsonl keys plot_curves leaves out (the x axis; not losses)
CURVE_STYLES = ("-", "--", ":", "-.")  # a line style per run, with a colour per run
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


def plot_curves(logs: dict, out: str) -> str:
    """{run name: its log.jsonl lines} -> `out`: every quantity logged but NOT_DRAWN (the loss and its terms,
    held-out accuracy in %) against step, a panel each in log order, a colour and line style per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for lines in logs.values() for r in lines for k in r) if k not in NOT_DRAWN]
    cols, rows = min(3, len(keys)), -(-len(keys) // 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False, sharex=True)
    handles = {}
    for i, (name, lines) in enumerate(logs.items()):
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], 100 * r[key] if key == "heldout_acc" else r[key]) for r in lines if key in r]
            handles[name] = ax.plot(*zip(*pts) if pts else ([], []), CURVE_STYLES[i % len(CURVE_STYLES)], color=f"C{i % 10}",
                                    marker="o" if key == "heldout_acc" else None, markersize=4)[0]
    for ax, key in zip(axes.flat, keys):
        ax.set(title="held-out accuracy (%)" if key == "heldout_acc" else key, xlabel="step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelbottom=True)  # steps shared, but every panel labelled: a column may end above the last row
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(3, len(logs)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out} ({len(keys)} panels, {len(logs)} run(s))")
    return out
