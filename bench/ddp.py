"""Gradient averaging under torchrun: the old flat all-reduce after backward vs DistributedDataParallel.

  python bench/ddp.py                                   # FT on miniworld + miniclip, 2 gloo processes
  python bench/ddp.py --model ViT-B-16 --fake-data 224 --batch-size 16 --rounds 3   # ViT-B/16's image tower

It starts itself under `torchrun --nproc_per_node 2` (gloo, one thread per process). Both paths train
FT's parameters (image tower + head, as `baselines.py --method ft`) on one fixed batch, side by side in
one process pair, rounds interleaved:
  flat  the code common.train used before: backward, then every gradient copied into one new flat
        buffer, one all_reduce, the buffer copied back (kept here, verbatim, as the reference);
  ddp   common.train's path now: the loss through DistributedDataParallel (common.LossOf), gradients
        averaged in buckets while backward runs, the gradients views into the persistent buckets.
Both give the same gradients (checked each round). The table shows each path's median step time over
rounds, their ratio, and the bytes the reduction allocates per step: the flat buffer is allocated anew
every step; DDP's buckets once, when the model is wrapped (measured: the change in the process's
allocated bytes across a step, torch.profiler's CPU memory accounting).

Writes its table into the "Distributed" section of bench/RESULTS.md (--no-write: print only).
"""
import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import baselines  # noqa: E402
import common  # noqa: E402
from retrieval import write_section  # noqa: E402


def flat_all_reduce(params: list, world: int):
    """The replaced common.all_reduce_gradients: averages gradients over processes in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat.numel() * flat.element_size()


def allocated_bytes(fn) -> int:
    """Bytes allocated (not freed) by the ops fn runs, from torch.profiler's CPU memory accounting."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())


def worker(a):
    device = torch.device("cpu")
    torch.set_num_threads(1)
    targs = common.parse_args(common.TrainArgs, {}, ["--data", a.data, "--data-root", a.data_root, "--model", a.model,
                                                    "--steps", "1", "--out", a.out, "--workers", "0"])
    env = common.setup(targs, "bench-ddp")
    rank, world = common.init_distributed(device)
    data = common.TransformedImages(env.task.train.images, env.train_tf)
    micro = a.batch_size // world
    batch = common.collate_skipping_bad([data[(i, i)] for i in range(rank * micro, (rank + 1) * micro)])
    common.pop_unreadable(batch)
    built = {}
    for path in ("flat", "ddp"):
        model = copy.deepcopy(env.model)
        loss_fn = baselines.ft(model, targs, env.task).loss_fn
        params = [p for p in model.parameters() if p.requires_grad]
        stepper = common.LossOf(model, loss_fn)
        if path == "ddp":
            stepper = torch.nn.parallel.DistributedDataParallel(stepper, broadcast_buffers=False, gradient_as_bucket_view=True)
        built[path] = (model.train(), stepper, params, torch.optim.AdamW(params, lr=1e-6))

    def step(path):
        model, stepper, params, opt = built[path]
        loss, _ = stepper(batch, 0)
        loss.backward()
        if path == "flat":
            flat_all_reduce(params, world)
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    for path in built:  # warm-up
        step(path)
    times = {p: [] for p in built}
    for r in range(a.rounds):
        grads = {}
        for path in (("flat", "ddp") if r % 2 == 0 else ("ddp", "flat")):  # alternate who goes first
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                grads[path] = step(path)
            dist.barrier()
            times[path].append((time.perf_counter() - t0) / a.steps * 1000)
        diff = max((x - y).abs().max().item() for x, y in zip(grads["flat"], grads["ddp"]))
        if diff > 1e-5:  # both average the same gradients: a difference is a bug, not noise
            raise SystemExit(f"error: flat and DDP gradients differ by {diff:.2e}")
        if rank == 0:
            print(f"round {r + 1}/{a.rounds}: flat {times['flat'][-1]:.0f} ms, ddp {times['ddp'][-1]:.0f} ms, "
                  f"max |grad difference| {diff:.1e}")
    grad_bytes = sum(p.numel() * p.element_size() for p in built["flat"][2])
    per_step = {"flat": allocated_bytes(lambda: step("flat")), "ddp": allocated_bytes(lambda: step("ddp"))}
    if rank != 0:
        return
    median = {p: statistics.median(v) for p, v in times.items()}
    command = os.environ.get("BENCH_DDP_COMMAND", "python bench/ddp.py")
    what = f"generated {a.fake_data} px images" if a.fake_data else a.data
    lines = [f"FT ({a.model} on {what}), global batch {a.batch_size} over {world} gloo processes (1 thread each), "
             f"torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}; median over {a.rounds} "
             f"interleaved rounds of {a.steps} steps; the two paths' gradients agreed to {diff:.1e}. "
             f"Command: `{command.strip()}`", "",
             f"Trainable gradients: {grad_bytes / 2**20:.1f} MiB: the flat path's new buffer every step. Allocated "
             "during one step: torch.profiler's CPU memory accounting, whole step (activations included).", "",
             "| gradient averaging | ms / step | ratio to flat | allocated per step (MiB) |", "|---|---|---|---|",
             f"| flat all-reduce after backward (old) | {median['flat']:.0f} | 1.00 | {per_step['flat'] / 2**20:.1f} |",
             f"| DistributedDataParallel, bucketed during backward (now) | {median['ddp']:.0f} | "
             f"{median['ddp'] / median['flat']:.2f} | {per_step['ddp'] / 2**20:.1f} |"]
    print("\n".join(lines))
    if not a.no_write:
        write_section(lines, f"ddp-{Path(a.model).stem}", "## Distributed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="miniworld")
    p.add_argument("--data-root", default="")
    p.add_argument("--model", default="miniclip")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over the 2 processes)")
    p.add_argument("--steps", type=int, default=3, help="steps of one path per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--fake-data", type=int, default=0, help="image size of a generated folder dataset (0 = use --data)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)  # as given: the worker processes get them back
    if "WORLD_SIZE" in os.environ:
        return worker(a)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    extra = []
    if a.fake_data:
        from step_time import fake_data

        fake_data(tmp / "data", a.fake_data, n_train=max(8, a.batch_size // 3 + 1))
        extra = ["--data", "folder", "--data-root", str(tmp / "data")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           str(Path(__file__).resolve()), *a.argv, *extra, "--out", str(tmp / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "BENCH_DDP_COMMAND": " ".join(["python bench/ddp.py", *a.argv])}
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
