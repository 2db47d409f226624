"""Text-space diagnostics of a world (issue #18's probe): how much of the text space do random texts
probe, and where does each method move the image features?

  python reproduce/diagnostics.py --runs runs/reproduce              # every finished run under RUNS
  python reproduce/diagnostics.py --runs runs/reproduce --out docs/diagnostics.md

Text space, of θ0's text tower (unit-norm embeddings t):
  * participation ratio PR = (Σλ)² / Σλ² of the second moment M = E[t tᵀ] (eigenvalues λ), and k90, the
    number of eigen-directions holding 90% of tr M; for Lipsum-FT's random texts (ENERGY_GAP_TEXTS of
    length TEXT_LENGTH, lipsum_ft's ENERGY_GAP_SEED) and for the training captions (miniworld's).
    PR ≈ 1 is one direction; a rich text space has PR in the tens.
  * head energy: the share ‖U_K U_Kᵀ Wᵀ‖² / ‖W‖² of the zero-shot head W [C, D] in the span U_K of the
    top K = TOP_K random-text directions. Near 100% means the random texts probe little beyond the
    class read-out, and Lipsum-FT's regulariser pulls on the same directions the classifier uses.
Feature change, per run, on up to IMAGES_PER_SPLIT images of every ID and OOD test split (eval transform):
  Δ = n(f_θ(x)) − n(f_θ0(x)); E‖Δ‖², its share along U_K (the rest is across it, where no random text
  reads it out), and E‖Δ‖² relative to FT of the same seed. Mean ± std over seeds per method.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOP_K = 16  # random-text directions whose span counts as "along" (the probe: 94.7% of the head's energy in 16)
IMAGES_PER_SPLIT = 500  # evenly spaced images of each ID / OOD test split scored per run


def spectrum(emb: torch.Tensor) -> tuple:
    """(eigenvalues descending [D], eigenvectors [D, D]) of the second moment of unit rows [N, D]."""
    emb = F.normalize(emb.double(), dim=-1)
    values, vectors = torch.linalg.eigh(emb.t() @ emb / len(emb))
    return values.flip(0).clamp_min(0), vectors.flip(1)


def participation(values: torch.Tensor) -> tuple:
    """(participation ratio, directions holding 90% of the trace)."""
    pr = float(values.sum() ** 2 / (values ** 2).sum())
    k90 = int((values.cumsum(0) / values.sum() < 0.9).sum()) + 1
    return pr, k90


def text_space(run, device) -> dict:
    """The text-space numbers of θ0's text tower, and U_K for the feature changes."""
    import common
    import lipsum_ft

    theta0 = common.run_theta0(run, device)
    texts = lipsum_ft.model_random_texts(theta0.clip, theta0.tokenizer, lipsum_ft.ENERGY_GAP_TEXTS, lipsum_ft.TEXT_LENGTH,
                                         torch.Generator().manual_seed(lipsum_ft.ENERGY_GAP_SEED))  # [N_t, ctx]
    values, vectors = spectrum(lipsum_ft.encode_texts(theta0.clip, texts, device).cpu())
    top = vectors[:, :TOP_K].float()  # [D, K]
    head = F.normalize(theta0.head.detach().float().cpu(), dim=-1)  # [C, D]
    out = {"random": participation(values), "head_energy": float((head @ top).pow(2).sum() / head.pow(2).sum()),
           "top": top, "dim": len(values)}
    captions = getattr(run.task.train.images, "captions", None)
    if captions:
        tokens = theta0.tokenizer(list(captions))  # [N_c, ctx]
        out["captions"] = participation(spectrum(lipsum_ft.encode_texts(theta0.clip, tokens, device).cpu())[0])
    return out


@torch.no_grad()
def feature_change(run, theta0, top: torch.Tensor, device) -> tuple:
    """(E‖Δ‖², share of it along span(top)) over the ID and OOD test splits' sampled images."""
    import common

    total, along, n = 0.0, 0.0, 0
    for split in (s for s in run.task.tests if s.kind in ("id", "ood")):
        images = split.images
        if len(images) > IMAGES_PER_SPLIT:
            images = images.subset(np.linspace(0, len(images) - 1, IMAGES_PER_SPLIT).round().astype(int))

        def delta(x):
            return run.model.image_features(x).float() - theta0.image_features(x).float()  # [B, D], unit-norm features

        d, _, _ = common.predict(delta, images, run.eval_tf, device)  # [N, D]
        total += d.pow(2).sum().item()
        along += (d @ top).pow(2).sum().item()
        n += len(d)
    return total / n, along / total if total > 0 else float("nan")


def finished_runs(runs: Path) -> list:
    """Training runs under RUNS (final.pt + args.json), not merges and not the zero-shot model."""
    out = []
    for d in sorted(p for p in runs.iterdir() if (p / "final.pt").is_file() and (p / "args.json").is_file()):
        args = json.loads((d / "args.json").read_text())
        if args.get("method") != "zeroshot" and "+" not in args.get("method", "") and args.get("steps", 0) > 0:
            out.append(d)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/reproduce", help="folder of finished runs (reproduce/reproduce.py's)")
    p.add_argument("--out", default="", help="write the markdown here too (printed either way)")
    p.add_argument("--device", default="", help="cuda | cpu")
    a = p.parse_args(argv)
    import common
    import lipsum_ft

    device = common.get_device(a.device)
    runs = finished_runs(Path(a.runs))
    if not runs:
        raise SystemExit(f"error: no finished training runs under {a.runs}")
    space, theta0, change = None, {}, defaultdict(dict)  # change[name][seed] = (E‖Δ‖², along)
    for d in runs:
        run = common.load_run(str(d), device)
        if space is None:  # the text space of the first run's θ0 (every seed's, for a pretrained CLIP)
            space = text_space(run, device)
        if run.seed not in theta0:  # θ0 as each seed's setup built it (a random-weight --model differs by seed)
            theta0[run.seed] = common.run_theta0(run, device)
        name = d.name.rsplit("-s", 1)[0]
        change[name][run.seed] = feature_change(run, theta0[run.seed], space["top"].to(device), device)
        print(f"{d.name}: E|Δ|² {change[name][run.seed][0]:.4g}, along top-{TOP_K} {100 * change[name][run.seed][1]:.1f}%")
    def fmt(values) -> str:  # mean ± std over seeds, '–' where undefined (LP moves no feature: no share)
        values = [v for v in values if not np.isnan(v)]
        if not values:
            return "–"
        return f"{np.mean(values):.3g} ± {np.std(values):.1g}" if len(values) > 1 else f"{np.mean(values):.3g}"

    pr, k90 = space["random"]
    lines = [f"Text space of θ0 ({space['dim']} dims): {lipsum_ft.ENERGY_GAP_TEXTS:,} random texts have participation ratio "
             f"{pr:.1f} (k90 = {k90} directions)" + (f"; the training captions {space['captions'][0]:.1f} (k90 = "
                                                      f"{space['captions'][1]})" if "captions" in space else "")
             + f". The zero-shot head has {100 * space['head_energy']:.1f}% of its energy in the top {TOP_K} random-text "
             "directions.", "",
             f"| run | seeds | E‖Δ‖² (ID + OOD images) | share along the top {TOP_K} random-text directions (%) | E‖Δ‖² / FT's |",
             "|---|---|---|---|---|"]
    ft = change.get("ft", {})
    for name, by_seed in change.items():
        ratio = [v[0] / ft[s][0] for s, v in by_seed.items() if s in ft and ft[s][0] > 0]
        lines.append(f"| {name} | {len(by_seed)} | {fmt([v[0] for v in by_seed.values()])} | "
                     f"{fmt([100 * v[1] for v in by_seed.values()])} | {fmt(ratio) if ratio else '–'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return space, change


if __name__ == "__main__":
    main()
