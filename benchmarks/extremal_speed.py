"""Speed of extremal perturbation's default path against TorchRay one photo at a time, and where
an iteration's time goes.

    python -m benchmarks.extremal_speed                     # 3 photos, 300 iterations: ~8 min on 2 cores
    python -m benchmarks.extremal_speed --images 8 --iterations 100 --repeats 5

EfficientNet-Lite0 with its real weights, real photos (the ImageNet sample, --data), area 0.1 and
TorchRay's other defaults. Contenders, interleaved (A, B, C, A, B, C…) `--repeats` times so that
another process's load falls on all of them:

    default    ours, default path, all photos in one batch
    torchray   TorchRay's `extremal_perturbation`, one photo after the other
    floor      `iterations` × one forward + backward to the input of the whole batch: what the
               algorithm cannot avoid

Printed: each repeat's time and its ratios default / torchray (target ≤ 0.6) and default / floor,
their median and spread (min–max). Then one iteration taken apart, each piece forward and
backward, ms per photo (median and min–max of `--repeats` × 5 runs): the network at the batch
and one photo at a time, the mask generator (ours, and TorchRay's operations), `perturb`, the area
term (ours ranks with topk, TorchRay sorts) and the jitter's flip.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from benchmarks._stats import interleaved, spread
from opticam_core import explain, load_model
from opticam_core.methods.extremal import (
    AreaRegulariser,
    SmoothMasks,
    perturb,
    perturbation_pyramid,
)

from .extremal_quality import DATA, load_photo, photos, torchray_extremal


def torchray_all(model, x, labels, iterations):
    with torchray_extremal() as extremal_perturbation:
        for i, label in enumerate(labels):
            extremal_perturbation(model, x[i:i + 1], label, areas=[0.1], max_iter=iterations)


def forward_backward(model, x, labels):
    xi = x.detach().requires_grad_(True)
    score = model(xi).gather(1, labels[:, None]).sum()
    torch.autograd.grad(score, xi)


def whole_runs(bundle, x, labels, iterations, repeats):
    contenders = {
        "default": lambda: explain(bundle, x, labels, "extremal", areas=0.1, iterations=iterations),
        "torchray": lambda: torchray_all(bundle.model, x, labels.tolist(), iterations),
        "floor": lambda: [forward_backward(bundle.model, x, labels) for _ in range(iterations)],
    }
    def row(r, times, _cpu):
        last = {n: times[n][-1] for n in contenders}
        print(f"{r:>6}  {'  '.join(f'{last[n]:8.1f}s' for n in contenders)}   "
              f"{last['default'] / last['torchray']:16.3f}  {last['default'] / last['floor']:13.3f}")

    print(f"\nrepeat  {'  '.join(f'{n:>9}' for n in contenders)}   default/torchray  default/floor")
    times, _ = interleaved(contenders, repeats, after_repeat=row)
    vs_peer = [d / t for d, t in zip(times["default"], times["torchray"])]
    vs_floor = [d / f for d, f in zip(times["default"], times["floor"])]
    print(f"default / torchray: median {spread(vs_peer)}   (target <= 0.6)")
    print(f"default / floor:    median {spread(vs_floor)}")


def pieces(bundle, x, labels, repeats):
    """One iteration's pieces, forward and backward, interleaved; ms per photo."""
    from torchray.attribution.extremal_perturbation import MaskGenerator

    B = len(x)
    gen = SmoothMasks(tuple(x.shape[-2:]))
    pyramid = perturbation_pyramid(x)
    params = torch.rand(B, 1, *gen.grid)
    pixels = gen.full[0] * gen.full[1]
    full = torch.rand(B, pixels)
    mask = torch.rand(B, 1, *x.shape[-2:])
    terms = {exact: AreaRegulariser(pixels, [0.1], exact=exact) for exact in (False, True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchRay's deprecated meshgrid call
        peer = MaskGenerator(tuple(x.shape[-2:]), 7, 21)

    def grad_of(fn, leaf):
        leaf = leaf.clone().requires_grad_(True)
        out = fn(leaf)
        torch.autograd.grad(sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum(), leaf)

    parts = {
        "network, the batch": lambda: forward_backward(bundle.model, x, labels),
        "network, 1 photo at a time": lambda: [forward_backward(bundle.model, x[i:i + 1], labels[i:i + 1])
                                               for i in range(B)],
        "mask generator (ours)": lambda: grad_of(gen, params),
        "mask generator (TorchRay's)": lambda: [grad_of(peer.generate, params[i:i + 1]) for i in range(B)],
        "perturb": lambda: grad_of(lambda m: perturb(pyramid, m), mask),
        "area term, topk (ours)": lambda: grad_of(lambda f: terms[False](f, 300.0), full),
        "area term, sort (TorchRay)": lambda: grad_of(lambda f: terms[True](f, 300.0), full),
        "jitter flip": lambda: torch.flip(x, dims=(3,)),
    }
    times = {name: [] for name in parts}
    for fn in parts.values():
        fn()
    for _ in range(5 * repeats):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000 / B)
    print(f"\none iteration, forward + backward, ms per photo (median [min-max] of {5 * repeats}):")
    for name, values in times.items():
        print(f"  {name:<32} {spread(values)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--no-pieces", dest="pieces", action="store_false")
    args = p.parse_args(argv)
    bundle = load_model("efficientnet_lite0")
    chosen = photos(args.data, args.images)
    x = torch.stack([load_photo(args.data / f) for f, _ in chosen])
    labels = torch.tensor([label for _, label in chosen])
    print(f"EfficientNet-Lite0, {args.images} photos, {args.iterations} iterations, CPU, "
          f"torch threads {torch.get_num_threads()}")
    whole_runs(bundle, x, labels, args.iterations, args.repeats)
    if args.pieces:
        pieces(bundle, x, labels, args.repeats)


if __name__ == "__main__":
    main()
