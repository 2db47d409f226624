"""ARF's retrieval cost: faiss (arf.build_index) vs exact torch search on synthetic pools.

  python bench/retrieval.py                 # pools of 10k, 100k and 1M x 512: build, query time, recall@10
  python bench/retrieval.py --n 1000000     # one size

Writes its table into the "Retrieval (ARF)" section of bench/RESULTS.md.

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


def write_section(lines: list, key: str, section: str = SECTION):
    """Replace the `key` block (between <!-- key --> markers) inside `section` of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    block = f"<!-- {key} -->\n" + "\n".join(lines) + f"\n<!-- /{key} -->"
    pattern = re.compile(f"<!-- {key} -->.*?<!-- /{key} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:  # append at the end of the section
        start = text.index(section)
        nxt = text.find("\n## ", start + len(section))
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n\n" + block + "\n" + text[end:]
    RESULTS.write_text(text)


def bench_search(args):
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = [int(n) for n in args.n.split(",")]
    queries = synthetic(args.queries, args.d, seed=2)
    rows = []
    for n in sizes:
        pool = synthetic(n, args.d, seed=1)
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
        ivf = faiss.try_extract_index_ivf(index)
        spec = type(index).__name__ + (f" nlist {ivf.nlist}, nprobe {ivf.nprobe}" if ivf is not None else "")
        rows.append(f"| {n:,} | {spec} | {build:.1f} | {1000 * t_exact / args.queries:.2f} | "
                    f"{1000 * t_faiss / args.queries:.3f} | {recall:.3f} | {t_exact / t_faiss:.1f}x |")
        print(rows[-1])
        del pool, pool_t, index
    lines = [
        f"Synthetic pools x {args.d} (float32, clustered; see bench/retrieval.py), {args.queries:,} queries, k = {args.k}, "
        f"{args.threads} CPU threads, {time.strftime('%Y-%m-%d')}, faiss {faiss.__version__}, torch {torch.__version__}.",
        f"Command: `python bench/retrieval.py --n {args.n} --queries {args.queries}`. The index is what ARF builds "
        "(`arf.build_index`: exact below 1M rows, IVF from there); exact = torch `q @ poolᵀ` + top-k.",
        "",
        "| pool rows | faiss index | build (s) | exact ms / query | faiss ms / query | recall@10 vs exact | speed-up |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section(lines, "search")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="10000,100000,1000000", help="comma-separated pool sizes")
    p.add_argument("--d", type=int, default=512, help="embedding width")
    p.add_argument("--queries", type=int, default=1_000, help="query vectors")
    p.add_argument("--k", type=int, default=10, help="neighbours")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and faiss")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    bench_search(p.parse_args(argv))


if __name__ == "__main__":
    main()
