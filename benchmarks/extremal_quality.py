"""Extremal perturbation's two paths against TorchRay, by TorchRay's own objective, on real photos.

    python -m benchmarks.extremal_quality                               # 32 photos, 300 iterations
    python -m benchmarks.extremal_quality --images 8 --iterations 800   # TorchRay's default horizon

EfficientNet-Lite0 with its real weights, photos from the ImageNet sample (--data; evenly spaced
over its 500 classes), each explained for its label, area 0.1 and TorchRay's other defaults.
Paths, each photo:

    torchray        TorchRay's `extremal_perturbation`, one photo at a time: the reference
    chaos           TorchRay with its mask kernel's weights moved up by one ulp: what float
                    rounding alone does (it reorders the exact ties of the first masks, as any
                    change of float operations does; moving the photo by one ulp leaves those
                    ties, and on a toy network the masks, unchanged for 20 iterations)
    default         ours, default path, `--batch` photos at once
    exact_batched   ours, `torchray_ops=True`, batched (the first --exact-images photos)
    exact_single    ours, `torchray_ops=True`, one photo at a time (the same subset)

Per path: the final reward (the preserve objective TorchRay ascends: the target logit of the
perturbed photo at the last iteration, the one that produced the mask), the area term (the
regulariser's value then, −w·mean((sort(m) − r)²): how far the mask is from its area), the area
(fraction of the photo's mask above 0.5), the mask's Pearson correlation with TorchRay's, and wall
time per photo. Then each path's paired difference from TorchRay (mean over photos, 95%
bootstrap interval), next to the chaos baseline's.

Verdict: the default path's loss is real when its mean reward difference from TorchRay lies
below −1.96 × the standard error that rounding alone gives a mean over these photos (the
chaos differences' SD / √n): a loss rounding would produce less than 5% of the time. The script
also prints the smallest loss this sample detects (2.8 standard errors: 80% power at 5%).

Runtime, 2 cores, quiet: about 75 s per photo at 300 iterations (TorchRay 30 s, chaos 30 s,
default 15 s), plus 90 s per exact photo: 32 photos and 4 exact ones take about 45 min; 8
photos at 800 iterations about 25 min. Results go to --out (JSON lines, one per photo and
iteration count); photos already there are not recomputed, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from opticam_core import explain, load_model
from opticam_core.metrics import preprocess

DATA = Path("/work/shared/data/imagenet-sample")
PATHS = ("torchray", "chaos", "default", "exact_batched", "exact_single")


def photos(data: Path, count: int) -> list[tuple[str, int]]:
    """`count` (file, label) pairs evenly spaced over the sample's sorted rows."""
    with open(data / "labels.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    picks = np.linspace(0, len(rows) - 1, count).round().astype(int)
    return [(rows[i]["file"], int(rows[i]["class_index"])) for i in picks]


def load_photo(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return preprocess(decode_image(str(path), mode=ImageReadMode.RGB))


@contextmanager
def torchray_extremal(nudged: bool = False):
    """TorchRay's `extremal_perturbation` function, its deprecation warnings silenced; `nudged`:
    with its mask kernel's weights moved up by one ulp (what a change of float rounding does to
    it: the chaos reference). tests/test_extremal.py uses it too."""
    from torchray.attribution import extremal_perturbation as ep

    class NudgedMaskGenerator(ep.MaskGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.weight = torch.nextafter(self.weight, torch.full_like(self.weight, 2.0))

    original = ep.MaskGenerator
    ep.MaskGenerator = NudgedMaskGenerator if nudged else original
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchRay's deprecated meshgrid call
            yield ep.extremal_perturbation
    finally:
        ep.MaskGenerator = original


def torchray_run(model, x: torch.Tensor, label: int, iterations: int, nudged: bool = False):
    """TorchRay on one photo: its H×W mask, final reward and final area term; `nudged`: with
    its mask kernel's weights moved up by one ulp."""
    with torchray_extremal(nudged) as extremal_perturbation:
        mask, hist = extremal_perturbation(model, x[None], label, areas=[0.1], max_iter=iterations)
    return mask[0, 0], float(hist[0, 0, -1]), float(hist[0, 1, -1])


def ours_run(bundle, x: torch.Tensor, labels: list[int], iterations: int, exact: bool):
    """Ours on a batch: B×H×W masks, B final rewards and area terms."""
    e = explain(bundle, x, torch.tensor(labels), "extremal", areas=0.1, iterations=iterations, torchray_ops=exact)
    return e.maps, e.extras["reward"][:, 0].tolist(), e.extras["regul"][:, 0].tolist()


def record(mask: torch.Tensor, reward: float, regul: float, seconds: float, reference: torch.Tensor | None):
    out = {"reward": reward, "regul": regul, "area": float((mask > 0.5).float().mean()), "seconds": seconds}
    if reference is not None:
        out["corr"] = float(torch.corrcoef(torch.stack((mask.flatten(), reference.flatten())))[0, 1])
        out["max_abs_diff"] = float((mask - reference).abs().max())
    return out


def run_batch(bundle, batch: list[tuple[str, int]], xs: torch.Tensor, iterations: int, exact: bool) -> list[dict]:
    """Every path on one batch of photos; the exact paths when `exact`."""
    model = bundle.model
    labels = [label for _, label in batch]
    rows = [{"file": f, "label": label, "iterations": iterations} for f, label in batch]
    reference = []
    for row, x, label in zip(rows, xs, labels):
        t0 = time.perf_counter()
        mask, reward, regul = torchray_run(model, x, label, iterations)
        row["torchray"] = record(mask, reward, regul, time.perf_counter() - t0, None)
        reference.append(mask)
        t0 = time.perf_counter()
        mask, reward, regul = torchray_run(model, x, label, iterations, nudged=True)
        row["chaos"] = record(mask, reward, regul, time.perf_counter() - t0, reference[-1])
    batched = [("default", False)] + ([("exact_batched", True)] if exact else [])
    for name, ops in batched:
        t0 = time.perf_counter()
        masks, rewards, reguls = ours_run(bundle, xs, labels, iterations, ops)
        seconds = (time.perf_counter() - t0) / len(batch)
        for i, row in enumerate(rows):
            row[name] = record(masks[i], rewards[i], reguls[i], seconds, reference[i])
    if exact:
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            masks, rewards, reguls = ours_run(bundle, xs[i:i + 1], labels[i:i + 1], iterations, True)
            row["exact_single"] = record(masks[0], rewards[0], reguls[0], time.perf_counter() - t0, reference[i])
    return rows


def bootstrap_ci(values: np.ndarray, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(rows: list[dict], iterations: int) -> None:
    print(f"\n== {iterations} iterations, {len(rows)} photos ==")
    print(f"{'path':<14} {'n':>3} {'reward':>8} {'area':>7} {'regul':>8} {'corr':>6} {'s/photo':>8}"
          f"  {'Δreward vs torchray [95% CI]':<34} {'Δarea':>8} {'Δregul':>8}")
    ref = {r["file"]: r["torchray"] for r in rows}
    diffs = {}
    for path in PATHS:
        have = [r for r in rows if path in r]
        if not have:
            continue
        col = lambda key: np.array([r[path][key] for r in have])
        line = (f"{path:<14} {len(have):>3} {col('reward').mean():8.3f} {col('area').mean():7.4f} "
                f"{col('regul').mean():8.3f} {col('corr').mean() if path != 'torchray' else 1:6.3f} "
                f"{col('seconds').mean():8.1f}")
        if path != "torchray":
            d = col("reward") - np.array([ref[r["file"]]["reward"] for r in have])
            diffs[path] = d
            lo, hi = bootstrap_ci(d)
            da = col("area") - np.array([ref[r["file"]]["area"] for r in have])
            dg = col("regul") - np.array([ref[r["file"]]["regul"] for r in have])
            line += (f"  {d.mean():+8.3f} [{lo:+.3f}, {hi:+.3f}] sd {d.std(ddof=1):6.3f}"
                     f"  {da.mean():+8.4f} {dg.mean():+8.3f}")
        print(line)
    if "chaos" in diffs and "default" in diffs:
        verdict(diffs, np.array([r["torchray"]["reward"] for r in rows]), rows)


def verdict(diffs: dict[str, np.ndarray], reference: np.ndarray, rows: list[dict]) -> None:
    chaos, default = diffs["chaos"], diffs["default"]
    n = len(chaos)
    se = chaos.std(ddof=1) / math.sqrt(n)
    tolerance = 1.96 * se
    print(f"chaos: per-photo |Δreward| median {np.median(np.abs(chaos)):.3f}, max {np.abs(chaos).max():.3f}; "
          f"relative to the photo's reward: max {np.max(np.abs(chaos) / np.abs(reference)):.1%}")
    print(f"tolerance (1.96 × chaos SE over {n} photos): ±{tolerance:.3f} "
          f"({tolerance / reference.mean():.1%} of TorchRay's mean reward {reference.mean():.3f}); "
          f"smallest loss this sample detects (2.8 SE): {2.8 * se:.3f} ({2.8 * se / reference.mean():.1%})")
    d_minus_c = default - chaos
    lo, hi = bootstrap_ci(d_minus_c)
    print(f"default − chaos, paired: {d_minus_c.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    loss = default.mean() < -tolerance
    print(f"verdict: default path {'LOSES reward beyond rounding' if loss else 'equals TorchRay within rounding'} "
          f"(mean Δ {default.mean():+.3f} vs tolerance ±{tolerance:.3f})")
    if "exact_single" in rows[0]:
        exact = [r for r in rows if "exact_single" in r]
        same = sum(r["exact_single"]["max_abs_diff"] == 0 and r["exact_single"]["reward"] == r["torchray"]["reward"]
                   for r in exact)
        print(f"exact_single bit for bit equal to TorchRay (mask and reward): {same}/{len(exact)}")


def batches(chosen, done: set[str], size: int, exact_images: int):
    """(photos, run the exact paths) batches of the photos not done: the exact subset first."""
    exact = [fl for fl in chosen[:exact_images] if fl[0] not in done]
    rest = [fl for fl in chosen[exact_images:] if fl[0] not in done]
    return ([(exact, True)] if exact else []) + [(rest[i:i + size], False) for i in range(0, len(rest), size)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="photos per batch of our batched paths")
    p.add_argument("--exact-images", type=int, default=4, help="photos (the first ones) that also run the exact paths")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("extremal_quality.jsonl"))
    p.add_argument("--summary-only", action="store_true", help="summarise --out without computing")
    args = p.parse_args(argv)
    done = []
    if args.out.exists():
        done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    done = [r for r in done if r["iterations"] == args.iterations]
    chosen = photos(args.data, args.images)
    if not args.summary_only:
        bundle = load_model("efficientnet_lite0")
        print(f"EfficientNet-Lite0, {args.images} photos, {args.iterations} iterations, batch {args.batch}, "
              f"torch threads {torch.get_num_threads()}")
        for batch, exact in batches(chosen, {r["file"] for r in done}, args.batch, args.exact_images):
            xs = torch.stack([load_photo(args.data / f) for f, _ in batch])
            rows = run_batch(bundle, batch, xs, args.iterations, exact)
            with open(args.out, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            done += rows
            print(f"  {len(done)}/{len(chosen)} photos done")
    files = {f for f, _ in chosen}
    summarise([r for r in done if r["file"] in files], args.iterations)


if __name__ == "__main__":
    main()
