"""ARF's costs: faiss retrieval vs exact torch search, and ARF's step time vs FT's.

  python bench/retrieval.py search     # synthetic 1M x 512 pool: recall@10 and speed of arf.build_index
  python bench/retrieval.py step       # ms per optimiser step, FT vs ARF (miniworld + miniclip)
  python bench/retrieval.py step --vit # the same for a (random-weight) ViT-B/16 on generated 224px images

Each writes its table into the "Retrieval (ARF)" section of bench/RESULTS.md.

The pool is synthetic but shaped like CLIP embeddings (clustered, low intrinsic dimension): a
mixture of 2,000 overlapping Gaussians (within-cluster spread = spread of the centres) in a 64-d
latent space, mapped to 512-d by a fixed random matrix, plus isotropic noise, unit-normalised.
Queries are fresh draws from the same mixture (not pool rows). Isotropic Gaussian data would be a
worst case no index handles (every point nearly equidistant); well-separated clusters an easy one.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import arf  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Retrieval (ARF)"


def synthetic(n: int, d: int, seed: int, clusters: int = 2000, latent: int = 64, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(0)  # the mixture and the map are shared by pool and queries
    centres = rng.normal(size=(clusters, latent)).astype(np.float32)
    lift = rng.normal(size=(latent, d)).astype(np.float32) / np.sqrt(latent)
    draw = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        z = centres[draw.integers(0, clusters, m)] + draw.normal(size=(m, latent)).astype(np.float32)
        x = z @ lift + 0.3 * draw.normal(size=(m, d)).astype(np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(pool: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 250_000):
    """Brute force: q @ poolᵀ chunk by chunk, running top-k (what one writes without faiss)."""
    best_s = torch.full((len(queries), k), -float("inf"))
    best_i = torch.zeros((len(queries), k), dtype=torch.long)
    for i in range(0, len(pool), chunk):
        s, j = (queries @ pool[i:i + chunk].t()).topk(k, dim=1)  # [Q, k]
        s, pick = torch.cat([best_s, s], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, j + i], 1).gather(1, pick)
        best_s = s
    return best_i


def write_section(lines: list, key: str):
    """Replace the `key` block (between <!-- key --> markers) inside the ARF section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n"
    block = f"<!-- {key} -->\n" + "\n".join(lines) + f"\n<!-- /{key} -->"
    pattern = re.compile(f"<!-- {key} -->.*?<!-- /{key} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:  # append at the end of the ARF section
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n\n" + block + "\n" + text[end:]
    RESULTS.write_text(text)


def bench_search(args):
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    pool = synthetic(args.n, args.d, seed=1)
    queries = synthetic(args.queries, args.d, seed=2)
    print(f"generated {args.n} x {args.d} pool in {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    index = arf.build_index(pool)
    build = time.perf_counter() - t

    t = time.perf_counter()
    approx = arf.search(index, queries, args.k)
    t_faiss = time.perf_counter() - t

    pool_t, q_t = torch.from_numpy(pool), torch.from_numpy(queries)
    exact_topk(pool_t, q_t[:8], args.k)  # warm-up
    t = time.perf_counter()
    exact = exact_topk(pool_t, q_t, args.k).numpy()
    t_exact = time.perf_counter() - t

    recall = np.mean([len(set(a) & set(e)) / args.k for a, e in zip(approx, exact)])
    spec = type(index).__name__ + (f" nlist {index.nlist}, nprobe {index.nprobe}" if hasattr(index, "nprobe") else "")
    lines = [
        f"Synthetic pool {args.n:,} x {args.d} (float32, clustered; see bench/retrieval.py), {args.queries:,} queries, "
        f"k = {args.k}, {args.threads} CPU threads (machine shared with other jobs).",
        f"Command: `python bench/retrieval.py search --n {args.n} --queries {args.queries}`",
        "",
        "| search | index | build (s) | search (s) | ms / query | recall@10 vs exact | speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| exact torch (q @ poolᵀ, top-k) | none | 0 | {t_exact:.2f} | {1000 * t_exact / args.queries:.2f} | 1.000 | 1.0x |",
        f"| faiss via arf.build_index | {spec} | {build:.1f} | {t_faiss:.3f} | {1000 * t_faiss / args.queries:.3f} | "
        f"{recall:.3f} | {t_exact / t_faiss:.1f}x |",
    ]
    print("\n".join(lines))
    write_section(lines, "search")


def fake_folder(root: Path, size: int = 224) -> list:
    """Random 224px JPEGs in --data folder layout, a captions file and a pool: the step time of a
    ViT-B/16 does not depend on what the pixels show. Returns the arguments that point arf.py at them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["filepath\ttitle"]
    caps = []
    for split, n in (("train", 24), ("test", 1)):
        for c in ("cat", "dog", "owl", "fox"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
                caps.append(f"{split}/{c}/{i}.jpg\ta photo of a {c} sitting on the grass, number {i}")
    (root / "pool").mkdir(exist_ok=True)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "pool" / f"{i}.jpg")
        rows.append(f"pool/{i}.jpg\ta retrieved picture of something, number {i}")
    (root / "captions.tsv").write_text("\n".join(caps) + "\n")
    (root / "pool.tsv").write_text("\n".join(rows) + "\n")
    return ["--captioner", "dataset", "--captions", str(root / "captions.tsv"), "--pool", str(root / "pool.tsv")]


def bench_step(args):
    """Time of one optimiser step (forward, backward, AdamW) of FT's and ARF's losses on the same model
    and batch; ARF's retrieved batch comes from the real anchor stream. One thread and process CPU
    time: on a shared machine wall time measures the neighbours as much as the code."""
    torch.set_num_threads(1)
    import tempfile

    import baselines
    import common

    shared = ["--steps", str(args.steps), "--eval-every", "0", "--ckpt-every", "0"]
    arf_only = list(args.extra)
    if args.vit:
        root = Path(tempfile.mkdtemp(prefix="bench-vit-"))
        arf_only += fake_folder(root) + ["--cache", str(root / "cache")]
        shared += ["--data", "folder", "--data-root", str(root), "--model", "ViT-B-16", "--batch-size", str(args.vit_batch)]
    cpu, wall = {}, {}
    for name, module in (("ft", baselines), ("arf", arf)):
        clocks = []
        real_train = common.train

        def timed(env, loss_fn, a, after_step=None, extra_state=None):
            def clock(step):
                clocks.append((time.process_time(), time.perf_counter()))
                if after_step:
                    after_step(step)
            return real_train(env, loss_fn, a, after_step=clock, extra_state=extra_state)

        module.train, module.finish = timed, (lambda *a, **k: [])
        try:
            more = ["--method", "ft"] if name == "ft" else arf_only
            module.main(shared + more + ["--out", f"/tmp/bench-step-{name}-{time.time_ns()}"])
        finally:
            module.train, module.finish = real_train, common.finish
        c = np.diff(np.array(clocks[1:]), axis=0)  # per-step (cpu, wall), the first step dropped (warm-up)
        cpu[name], wall[name] = 1000 * float(np.median(c[:, 0])), 1000 * float(np.median(c[:, 1]))
    what = (f"random-weight ViT-B/16 on generated 224px images, batch {args.vit_batch}" if args.vit
            else "miniworld + miniclip, batch 128")
    ret = [a for a in args.extra if a.startswith("--ret-batch-size")] or ["retrieved batch = half the batch"]
    cmd = f"python bench/retrieval.py step --steps {args.steps}" + (f" --vit --vit-batch {args.vit_batch}" if args.vit else "")
    lines = [
        f"**{what}** ({' '.join(args.extra) or ret[0]}), 1 CPU thread, median over {args.steps - 2} steps. "
        f"Command: `{cmd}{' -- ' + ' '.join(args.extra) if args.extra else ''}`",
        "",
        "| method | CPU ms / step | ratio to FT | wall ms / step (shared machine) |",
        "|---|---|---|---|",
        f"| FT (image tower + head, CE) | {cpu['ft']:.0f} | 1.00 | {wall['ft']:.0f} |",
        f"| ARF (both towers, 3 contrastive terms) | {cpu['arf']:.0f} | {cpu['arf'] / cpu['ft']:.2f} | {wall['arf']:.0f} |",
    ]
    print("\n".join(lines))
    write_section(lines, "step-" + ("vit" if args.vit else "miniclip") + "".join(args.extra).replace("--", "-"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["search", "step"])
    p.add_argument("--n", type=int, default=1_000_000)  # pool rows
    p.add_argument("--d", type=int, default=512)  # embedding width
    p.add_argument("--queries", type=int, default=1_000)  # query vectors
    p.add_argument("--k", type=int, default=10)  # neighbours
    p.add_argument("--threads", type=int, default=2)  # CPU threads for torch and faiss
    p.add_argument("--steps", type=int, default=12)  # optimiser steps timed in `step`
    p.add_argument("--vit", action="store_true")  # `step` on a ViT-B/16 (random weights, generated images)
    p.add_argument("--vit-batch", type=int, default=16)  # batch for --vit
    p.add_argument("extra", nargs="*", help="`step`: extra arguments for arf.py (after --), e.g. -- --ret-batch-size 32")
    args = p.parse_args()
    bench_search(args) if args.what == "search" else bench_step(args)


if __name__ == "__main__":
    main()
