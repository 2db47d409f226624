"""What --grad-checkpointing costs and saves: FT's training step (image tower + head, AdamW) with and
without open_clip's gradient checkpointing, side by side.

  python bench/grad_checkpointing.py                                   # ViT-B/16 at batch 8 on this CPU
  python bench/grad_checkpointing.py --model ViT-L-14 --batch-size 64 --device cuda   # the GPU figure

Each measurement is a fresh process (random weights: the cost does not depend on them) that builds
the model, runs one warm-up step and times `--steps` steps; rounds alternate off/on so a slow moment of
a shared machine hits both alike, and the table shows medians over rounds. Memory: on CUDA the peak
allocated memory of a step (weights, AdamW state, activations); on CPU, which has no allocator
statistics, the process's peak resident memory (ru_maxrss), which includes the weights and the
optimiser state both configurations share. The weights of a run are the same with and without the
flag (tests/test_families.py: ≤ 1e-6).

Writes its table into the "Gradient checkpointing" section of bench/RESULTS.md (--no-write: print only).
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import towers  # noqa: E402

SECTION = "## Gradient checkpointing"


def measure(args) -> dict:
    """One configuration in this process: {"step_s", "peak_gib"}."""
    device = torch.device(args.device)
    common.seed_everything(0, device)
    clip, tokenizer, pp = common.load_clip(args.model, "", device)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][-1]
    head = common.zeroshot_head(clip, tokenizer, [f"thing {i}" for i in range(10)], ["a photo of a {}."], device)  # [10, D]
    model = common.set_trainable(common.ClipClassifier(clip, head, tokenizer).to(device))  # FT: image tower + head
    if args.checkpointing:
        towers.grad_checkpointing(model.clip, None)
    towers.train_mode(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    x = torch.randn(args.batch_size, 3, size, size, device=device)  # [B, 3, H, W]
    y = torch.randint(0, 10, (args.batch_size,), device=device)  # [B]

    def step():
        with common.autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW's state, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"step_s": (time.perf_counter() - start) / args.steps, "peak_gib": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # a child process's configuration
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    runs = {False: [], True: []}
    base = [sys.executable, __file__, "--child", "--model", args.model, "--batch-size", str(args.batch_size), "--device",
            args.device, "--steps", str(args.steps)]
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            out = subprocess.run(base + (["--checkpointing"] if on else []), capture_output=True, text=True, check=True)
            runs[on].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {on: {k: statistics.median(m[k] for m in ms) for k in ("step_s", "peak_gib")} for on, ms in runs.items()}
    memory = "peak allocated GiB" if args.device.startswith("cuda") else "peak RSS GiB (weights + AdamW included)"
    lines = [f"{args.model}, FT step at batch {args.batch_size} on {args.device} "
             f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}), median of {args.rounds} rounds of {args.steps} step(s):", "",
             f"| --grad-checkpointing | step s | ratio | {memory} | ratio |", "|---|---|---|---|---|"]
    for on in (False, True):
        lines.append(f"| {'on' if on else 'off'} | {med[on]['step_s']:.3f} | {med[on]['step_s'] / med[False]['step_s']:.2f} | "
                     f"{med[on]['peak_gib']:.2f} | {med[on]['peak_gib'] / med[False]['peak_gib']:.2f} |")
    lines += ["", f"`python bench/grad_checkpointing.py --model {args.model} --batch-size {args.batch_size} --device {args.device} "
              f"--rounds {args.rounds} --steps {args.steps}`"]
    print("\n".join(lines))
    if not args.no_write:
        from retrieval import write_section

        write_section(lines, f"ckpt-{args.model}-{args.device.split(':')[0]}", SECTION)


if __name__ == "__main__":
    main()
