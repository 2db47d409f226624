"""Evaluation throughput: common.evaluate_split vs a bare open_clip inference loop, side by side.

  python bench/eval_speed.py                     # miniworld + miniclip, the ID test split (CPU)
  python bench/eval_speed.py --model ViT-B-16 --pretrained openai --data imagenet --data-root DIR --device cuda

The bare loop is what one writes from open_clip's README: a DataLoader over the same images with
the same eval transform, `encode_image`, normalise, logits against the zero-shot head, argmax. Ours
adds what a results table needs (bad-image skipping, logits kept for ECE/NLL, autocast on GPU).
Rounds alternate the two, so a slow moment of a shared machine hits both; the table shows the median
images/s of each and their ratio (target ≥ 0.95).

Writes its table into the "Evaluation speed" section of bench/RESULTS.md (--no-write: print only).
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from retrieval import write_section  # noqa: E402


@torch.inference_mode()
def bare_loop(clip, head, images, transform, device, batch_size: int, workers: int) -> float:
    """Accuracy of the plainest open_clip evaluation loop."""
    loader = torch.utils.data.DataLoader(common.TransformedImages(images, transform), batch_size=batch_size,
                                         num_workers=workers)
    correct = total = 0
    for batch in loader:
        x = batch["image"].to(device)
        f = F.normalize(clip.encode_image(x), dim=-1)  # [B, D]
        pred = (f @ head.t()).argmax(-1).cpu()  # [B]
        correct += int((pred == batch["label"]).sum())
        total += len(pred)
    return correct / total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="miniworld")
    p.add_argument("--data-root", default="")
    p.add_argument("--model", default="miniclip")
    p.add_argument("--pretrained", default="")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    targs = common.parse_args(common.TrainArgs, {a.data: {}}, ["--data", a.data, "--model", a.model, "--device", a.device,
                              "--data-root", a.data_root, "--out", f"/tmp/eval-speed-{time.time_ns()}"]
                              + (["--pretrained", a.pretrained] if a.pretrained else []))
    env = common.setup(targs, "bench")
    split = next(s for s in env.task.tests if s.kind == "id")
    model, device, n = env.model.eval(), env.device, len(split.images)
    ours_t, bare_t = [], []
    for r in range(a.rounds):
        t = time.perf_counter()
        ours = common.evaluate_split(model, split, env.task, env.eval_tf, device, a.batch_size, a.workers)["acc"]
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare = bare_loop(model.clip, model.head, split.images, env.eval_tf, device, a.batch_size, a.workers)
        bare_t.append(time.perf_counter() - t)
        print(f"round {r + 1}: ours {n / ours_t[-1]:.0f} img/s (acc {ours:.4f}), bare {n / bare_t[-1]:.0f} img/s (acc {bare:.4f})")
    if abs(ours - bare) > 1e-3:
        raise SystemExit(f"the two loops disagree on accuracy ({ours:.4f} vs {bare:.4f}): not the same evaluation")
    ours_ips, bare_ips = n / statistics.median(ours_t), n / statistics.median(bare_t)
    ratio = ours_ips / bare_ips
    command = "python bench/eval_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"{a.model} on {a.data} split `{split.name}` ({n} images), batch {a.batch_size}, {a.workers} loader workers, "
             f"{device.type} ({torch.get_num_threads()} torch threads); median of {a.rounds} alternating rounds; "
             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}. Command: `{command.strip()}`", "",
             "| loop | images / s | ratio | target |", "|---|---|---|---|",
             f"| bare open_clip loop | {bare_ips:.0f} | 1.00 | |",
             f"| common.evaluate_split | {ours_ips:.0f} | {ratio:.2f} | ≥ 0.95 " + ("(met)" if ratio >= 0.95 else "(**missed**)") + " |"]
    print("\n".join(lines))
    if not a.no_write:
        write_section(lines, f"eval-{Path(a.model).stem}-{device.type}", "## Evaluation speed")


if __name__ == "__main__":
    main()
