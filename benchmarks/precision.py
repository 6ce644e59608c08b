"""How far bf16 (and tf32) move the maps and the paper's numbers, against fp32, on real photos.

    python -m benchmarks.precision                       # 64 ImageNet sample photos, EfficientNet-Lite0, CPU
    python -m benchmarks.precision --photos 16 --methods gradcam,opticam

Per method, on the same photos and the same model (EfficientNet-Lite0's ImageNet weights), each
precision runs the whole chain as a run would (`explain` and `metrics.compute` with
`precision=`): its own maps, then its own metrics of those maps. Printed per method:
- the Pearson correlation of each photo's bf16 map with its fp32 map (mean and min),
- Δ = bf16 − fp32 of AD, AG, AI (classification) and I, D (insertion/deletion), in points, with a
  paired bootstrap 95% interval (the same resamples of photos for both precisions),
- ±h1000: the half-width of the bootstrap 95% interval of the fp32 value itself, scaled to a
  1,000-image run (h_N·√(N/1000)): the noise a 1,000-image run cannot resolve. A precision is
  a candidate default only where |Δ| and its interval stay inside it (issue 14: fidelity first).
- the wall time of bf16 over fp32 (methods and metrics), on this device.

tf32 is fp32 on a CPU (no TF32 units): it is measured on CUDA (`--precisions fp32,tf32,bf16`), and
its numerics anywhere as `tf32-emulated`: every Conv2d and Linear of the network computed as TF32
tensor cores do (`emulated_tf32`). Its times say nothing (the rounding costs extra work).
`fp32-ulp` is fp32 on the photos moved by one ulp: the Δ any float change makes (Opti-CAM and
extremal are chaotic), the yardstick for the others' Δ of the iterative methods.
Photos: ../shared/data/imagenet-sample (500 photos, one per even class; not in a fresh clone),
resize 256, centre crop 224, the label as target. Cheap settings, to fit minutes on a CPU:
Opti-CAM 20 iterations (default 100), extremal 20 iterations (default 800), insertion/deletion
28 steps (default 224). Score-CAM is not in the default list: 1,280 forwards per photo at
EfficientNet-Lite0's last layer, an hour on two CPU cores; add it with --methods.
"""

from __future__ import annotations

import argparse
import csv
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from opticam_core import explain, load_model
from opticam_core.metrics import aggregate, compute, preprocess
from pipeline.report.aggregates import counts_from_indices, resample_indices

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
METHODS = {"fakecam": {}, "gradcam": {}, "gradcampp": {}, "xgradcam": {}, "layercam": {}, "ablationcam": {},
           "opticam": {"iterations": 20}, "extremal": {"iterations": 20}}
METRICS = {"classification": {}, "insertion_deletion": {"steps": 28}}
NUMBERS = ("AD", "AG", "AI", "I", "D")


def photos(n: int, folder: Path = SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))[:n]
    images = []
    for r in rows:
        rgb = np.asarray(Image.open(folder / r["file"]).convert("RGB"))
        images.append(preprocess(torch.from_numpy(rgb.copy()).permute(2, 0, 1)))
    return torch.stack(images), torch.tensor([int(r["class_index"]) for r in rows])


EMULATED = "tf32-emulated"
#: fp32 on photos moved by one ulp: what any float change does (iterative methods are chaotic),
#: the yardstick for the other precisions' Δ
NUDGED = "fp32-ulp"


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """float32 → the nearest value with TF32's 10-bit mantissa (ties away from zero), as float32.
    (A kernel that truncates instead errs up to twice as much: this is the kinder case.)"""
    return ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)  # any strides: same item size


class _RoundInput(torch.autograd.Function):
    """TF32 rounding of an operand in the forward; the gradient passes through (the rounding of
    the gradient that meets the layer's weight is the output hook's)."""

    @staticmethod
    def forward(ctx, x):
        return tf32_round(x)

    @staticmethod
    def backward(ctx, g):
        return g


@contextmanager
def emulated_tf32(model: torch.nn.Module) -> Iterator[None]:
    """While open, every Conv2d and Linear of `model` computes as on TF32 tensor cores: both
    operands rounded to a 10-bit mantissa, products summed in float32 — the weights and inputs in
    the forward, the incoming gradient (against the rounded weights) in the backward. Weights
    are restored on exit. Convolutions outside the network (the metrics' blur) stay fp32, which
    on a GPU with the tf32 flags on they would not."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    saved = [m.weight.detach().clone() for m in layers]

    def pre(_m, args):
        return (_RoundInput.apply(args[0]), *args[1:])

    def post(_m, _args, out):
        if out.requires_grad:
            out.register_hook(tf32_round)

    handles = []
    try:
        with torch.no_grad():
            for m in layers:
                m.weight.copy_(tf32_round(m.weight))
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.weight.copy_(w)


def run(bundle, x, y, method, options, name, batch):
    """Maps and per-image metric values of one precision, batch by batch, and the seconds spent.
    name: a precision for both, or `METHODS/METRICS` (`bf16/fp32`: the maps in bf16, their
    metrics in fp32; either part may be `tf32-emulated`)."""
    if name == NUDGED:
        x, name = torch.nextafter(x, torch.full_like(x, 2.0)), "fp32"
    explain_in, _, metrics_in = name.partition("/")
    metrics_in = metrics_in or explain_in

    def numerics(part):  # (context, precision=) of one part
        if part == EMULATED:
            return emulated_tf32(bundle.model), "fp32"
        return nullcontext(), part

    maps, values, seconds = [], [], 0.0
    for s in range(0, len(x), batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        t0 = time.perf_counter()
        context, prec = numerics(explain_in)
        with context:
            m = explain(bundle, xb, yb, method, precision=prec, **options).maps
        context, prec = numerics(metrics_in)
        with context:
            v = compute(bundle, xb, yb, m, which=METRICS, precision=prec)
        seconds += time.perf_counter() - t0
        maps.append(m)
        values.append({k: v[k].cpu().numpy() for k in ("p", "o", "insertion", "deletion")})
    return torch.cat(maps), {k: np.concatenate([v[k] for v in values]) for k in values[0]}, seconds


def compare(ref_values, values, weights):
    """Per number: (Δ, Δ's 95% interval, the fp32 interval's half-width scaled to 1,000 images)."""
    n = len(ref_values["p"])
    a, b = aggregate(ref_values), aggregate(values)
    ra, rb = aggregate(ref_values, weights=weights), aggregate(values, weights=weights)
    out = {}
    for k in NUMBERS:
        d = np.asarray(rb[k].value) - np.asarray(ra[k].value)
        lo, hi = np.nanpercentile(d, [2.5, 97.5])
        qa = np.nanpercentile(np.asarray(ra[k].value), [2.5, 97.5])
        out[k] = (b[k].value - a[k].value, lo, hi, (qa[1] - qa[0]) / 2 * np.sqrt(n / 1000))
    return out


def network_speed(bundle, x, names, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Median seconds of one forward (no grad) and one forward + backward to the input of batch
    `x`, per precision, the precisions interleaved round by round (a loaded machine's drift hits
    them alike)."""
    from opticam_core.precision import precision

    t = torch.zeros(len(x), dtype=torch.long, device=x.device)

    def fwd():
        with torch.no_grad():
            bundle.model(x)

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        torch.autograd.grad(bundle.model(xi).gather(1, t[:, None]).sum(), xi)

    times = {(n, k): [] for n in names for k in (0, 1)}
    for r in range(rounds + 1):
        for n in names:
            with precision(n, bundle.model):
                for k, fn in enumerate((fwd, fwd_bwd)):
                    t0 = time.perf_counter()
                    fn()
                    if r:  # round 0 warms up
                        times[(n, k)].append(time.perf_counter() - t0)
    return {n: (float(np.median(times[(n, 0)])), float(np.median(times[(n, 1)]))) for n in names}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="the first is the reference; METHODS/METRICS (bf16/fp32) splits a run's two parts; "
                         f"{EMULATED}: TF32's numerics on any device; {NUDGED}: fp32 on photos one ulp away")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--folder", default=str(SAMPLE))
    ap.add_argument("--speed-only", action="store_true", help="only the interleaved network pass timings")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    bundle = load_model("efficientnet_lite0", device=device)
    x, y = photos(args.photos, Path(args.folder))
    x, y = x.to(device), y.to(device)
    names = args.precisions.split(",")
    weights = counts_from_indices(resample_indices(len(x), args.resamples, np.random.default_rng(0)), len(x))
    print(f"EfficientNet-Lite0, {len(x)} ImageNet sample photos, batch {args.batch}, {device}, "
          f"{args.threads} thread(s), torch {torch.__version__}; Δ = {names[1:]} − {names[0]} in points "
          f"(×100), paired bootstrap 95% interval ({args.resamples} resamples); ±h1000 = half-width of "
          f"the {names[0]} value's interval at 1,000 images")
    print(f"cheap settings: {METHODS['opticam']=}, {METHODS['extremal']=}, {METRICS['insertion_deletion']=}")
    passes = [n for n in dict.fromkeys(n.partition("/")[0] for n in names) if n not in (EMULATED, NUDGED)]
    speed = network_speed(bundle, x[:args.batch], passes)
    ref = speed[names[0]]
    print("network pass, batch", len(x[:args.batch]), ", median of 5 interleaved rounds: "
          + "; ".join(f"{n}: forward {f * 1e3:.0f} ms ({f / ref[0]:.2f}×), forward+backward {fb * 1e3:.0f} ms "
                      f"({fb / ref[1]:.2f}×)" for n, (f, fb) in speed.items()))
    if args.speed_only:
        return
    for name in passes:  # first calls (oneDNN's kernel choice, allocations) stay out of the timings
        run(bundle, x[:2], y[:2], "gradcam", {}, name, 2)
    for method in args.methods.split(","):
        options = METHODS.get(method, {})
        ref_maps, ref_values, ref_s = run(bundle, x, y, method, options, names[0], args.batch)
        for name in names[1:]:
            maps, values, s = run(bundle, x, y, method, options, name, args.batch)
            a, b = ref_maps.flatten(1).double(), maps.flatten(1).double()
            a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
            r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
            r = r[torch.isfinite(r)]  # constant maps (both zero) have no correlation
            same = int((ref_maps == maps).flatten(1).all(1).sum())
            print(f"\n{method} {name}: map corr mean {float(r.mean()) if len(r) else float('nan'):.4f} min "
                  f"{float(r.min()) if len(r) else float('nan'):.4f} (identical maps {same}/{len(x)}); "
                  f"time {s / ref_s:.2f}× {names[0]} ({ref_s / len(x):.2f} vs {s / len(x):.2f} s/photo)")
            for k, (d, lo, hi, h) in compare(ref_values, values, weights).items():
                flag = "inside" if max(abs(lo), abs(hi)) <= h else "OUTSIDE"
                print(f"  Δ{k:<2} {d:+7.3f}  [{lo:+7.3f}, {hi:+7.3f}]   ±h1000 {h:6.3f}  {flag}")


if __name__ == "__main__":
    main()
