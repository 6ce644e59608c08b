"""Speed of the metrics against their floor: `python -m benchmarks.metrics [--quick]`.

Insertion plus deletion with n steps costs at least 2n − 1 forwards per image plus one shared
forward of the black image (the clean image's probability is both curves' other end). The floor
is timed in the same run: exactly as many plain forwards of random images, in batches of the same
sizes. We report the ratio (target ≤ 1.2×) and images per second, for EfficientNet-Lite0 (real
weights) and ResNet50 (random weights), a batch of 8 at 224×224, on the CPU and on a GPU when
one is present. Localization (components at 101 thresholds and the saliency-metric forward) is
timed too, as seconds per batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks._stats import sync
from opticam_core import load_model
from opticam_core import metrics as M
from opticam_core.metrics._forward import resolve_batch_size


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _inputs(batch: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 224, 224, generator=gen)
    low = torch.rand(batch, 1, 7, 7, generator=gen)  # CAM-like maps: smooth, a few blobs
    up = torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    maps = (up - lo) / (hi - lo)
    boxes = [torch.tensor([[40.0, 30.0, 180.0, 200.0]])] * batch
    return images.to(device), maps.to(device), boxes


@torch.no_grad()
def bench_model(name: str, device: torch.device, *, batch: int, steps: int, chunk: int | None, repeats: int) -> dict:
    bundle = load_model(name, weights=None) if name == "resnet50" else load_model(name)
    bundle.to(device)
    images, maps, boxes = _inputs(batch, device)
    logits = bundle.model(images)
    bs = resolve_batch_size(chunk, device)
    n = len(M.step_counts(224 * 224, steps)) - 1
    total = batch * (2 * n - 1)
    sizes = [min(bs, total - s) for s in range(0, total, bs)] + [1]  # + the shared black image
    noise = torch.rand(bs, 3, 224, 224, device=device)

    def floor():
        for k in sizes:
            bundle.model(noise[:k])

    def metric():
        M.insertion_deletion(bundle, images, maps, clean_logits=logits, steps=steps, batch_size=bs)

    def localization():
        M.localization(maps, boxes, targets=logits.argmax(1), bundle=bundle, images=images)

    # warm up (allocator, cuDNN autotuning, lazy inits): one chunk of each kind
    bundle.model(noise)
    M.insertion_deletion(bundle, images[:1], maps[:1], clean_logits=logits[:1], steps=2, batch_size=bs)
    t_floor, t_metric, t_loc = [], [], []
    for _ in range(repeats):
        t_floor.append(_timed(floor, device))
        t_metric.append(_timed(metric, device))
        t_loc.append(_timed(localization, device))
    # the minimum: the run least disturbed by anything else on the machine
    tf, tm, tl = min(t_floor), min(t_metric), min(t_loc)
    return {"model": name, "device": str(device), "batch": batch, "steps": steps, "chunk": bs,
            "forwards": sum(sizes), "floor_s": tf, "metric_s": tm, "ratio": tm / tf,
            "images_per_s": batch / tm, "localization_s": tl}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 steps, one repeat, EfficientNet-Lite0 only")
    ap.add_argument("--models", default=None, help="comma-separated (default: efficientnet_lite0,resnet50)")
    ap.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default 224 (16 with --quick)")
    ap.add_argument("--chunk", type=int, default=None, help="step images per forward (default: 64 CPU, 256 GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = args.models.split(",") if args.models else (["efficientnet_lite0"] if args.quick else
                                                        ["efficientnet_lite0", "resnet50"])
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    steps = args.steps or (16 if args.quick else 224)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    header = f"{'model':<20}{'device':<8}{'steps':>6}{'chunk':>6}{'forwards':>9}{'floor s':>9}{'metric s':>9}" \
             f"{'ratio':>7}{'img/s':>8}{'loc s':>7}"
    print(header)
    results = []
    for device in devices:
        for name in models:
            r = bench_model(name, torch.device(device), batch=args.batch, steps=steps, chunk=args.chunk,
                            repeats=repeats)
            results.append(r)
            print(f"{r['model']:<20}{r['device']:<8}{r['steps']:>6}{r['chunk']:>6}{r['forwards']:>9}"
                  f"{r['floor_s']:>9.2f}{r['metric_s']:>9.2f}{r['ratio']:>7.3f}{r['images_per_s']:>8.3f}"
                  f"{r['localization_s']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
