"""AOPC speed against Quantus and against its floor: `python -m benchmarks.aopc_speed [--quick]`.

The paper's setting (Quantus `RegionPerturbation`, 14-px patches, 10 regions, MoRF) on
EfficientNet-Lite0 (real weights) at 224×224, in one run and on the same images and maps:

- ours: `region_perturbation` including the clean forward (as Quantus does), so that it does
  regions + 1 forwards per image like Quantus;
- Quantus 0.6 `RegionPerturbation` on the same model, images and maps (all images in one call);
- the floor: exactly as many plain forwards of random images (regions + 1 per image), in the same
  batch sizes as ours.

Reported per image: seconds of each, ours vs Quantus (target ≥ 10×) and ours vs the floor, and the
time each spends beyond the floor (perturbation, copies, numpy ↔ torch). On a CPU both are
dominated by the same forwards, so ours vs Quantus is bounded by how much of Quantus's time is its
own overhead; on a GPU the forwards are cheap and the overhead is what remains. A second, near-free
model (`cheap_bundle`) stands for that regime on a machine without a GPU. The two curves are checked to agree (max |Δ|) so that the timing compares equal work.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch

from benchmarks.metrics import _inputs, _timed
from opticam_core import load_model, wrap_model
from opticam_core import metrics as M
from opticam_core.metrics._forward import resolve_batch_size

PATCH, REGIONS = 14, 10


def cheap_bundle():
    """A 224×224 classifier whose forward costs ~1% of EfficientNet-Lite0's on a CPU (a 4×4
    stride-4 convolution, pooling, 1000 classes): where forwards are cheap, as on a GPU, what is
    left is each implementation's own work."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(256, 1000)).eval()
    return wrap_model(net, "1", name="cheap", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      prefix_tokens=None, tail=None, input_size=(224, 224), resize=224)


@torch.no_grad()
def bench(model: str, device: torch.device, *, images_n: int, chunk: int | None, repeats: int) -> dict:
    import quantus

    bundle = cheap_bundle() if model == "cheap" else load_model(model)
    bundle.to(device)
    images, maps, _ = _inputs(images_n, device)
    targets = bundle.model(images).argmax(1)
    bs = resolve_batch_size(chunk, device)
    total = images_n * REGIONS
    sizes = [min(bs, total - s) for s in range(0, total, bs)] + [images_n]  # + the clean forward
    noise = torch.rand(max(sizes), 3, 224, 224, device=device)
    metric = quantus.RegionPerturbation(patch_size=PATCH, regions_evaluation=REGIONS, order="morf",
                                        disable_warnings=True)
    x_np, a_np, y_np = images.cpu().numpy(), maps[:, None].cpu().numpy(), targets.cpu().numpy()
    dev = "cuda" if device.type == "cuda" else "cpu"
    results = {}

    def floor():
        for k in sizes:
            bundle.model(noise[:k])

    def ours():
        results["ours"] = M.region_perturbation(bundle, images, maps, targets, batch_size=bs)[1].cpu().numpy()

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results["quantus"] = np.asarray(metric(model=bundle.model, x_batch=x_np, y_batch=y_np, a_batch=a_np,
                                                   device=dev, batch_size=images_n))

    bundle.model(noise)  # warm up (allocator, cuDNN, lazy inits)
    ours()
    t_floor, t_ours, t_quantus = [], [], []
    for _ in range(repeats):
        t_floor.append(_timed(floor, device))
        t_ours.append(_timed(ours, device))
        t_quantus.append(_timed(theirs, device))
    tf, to, tq = min(t_floor), min(t_ours), min(t_quantus)  # the least disturbed run of each
    per = 1.0 / images_n
    return {"model": model, "device": str(device), "images": images_n, "chunk": bs, "forwards_per_image": REGIONS + 1,
            "floor_s_per_image": tf * per, "ours_s_per_image": to * per, "quantus_s_per_image": tq * per,
            "quantus_over_ours": tq / to, "ours_over_floor": to / tf,
            "ours_overhead_s_per_image": (to - tf) * per, "quantus_overhead_s_per_image": (tq - tf) * per,
            "max_abs_diff": float(np.abs(results["ours"] - results["quantus"]).max())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 images, one repeat")
    ap.add_argument("--images", type=int, default=None, help="default 16 (4 with --quick)")
    ap.add_argument("--models", default="efficientnet_lite0,cheap",
                    help="comma-separated: efficientnet_lite0 (real weights), cheap (a near-free forward)")
    ap.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    ap.add_argument("--chunk", type=int, default=None, help="step images per forward (default: 8 CPU, 256 GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (4 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    print(f"{'model':<19}{'device':<8}{'images':>7}{'chunk':>6}{'floor s/img':>12}{'ours s/img':>11}{'quantus s/img':>14}"
          f"{'quantus/ours':>13}{'ours/floor':>11}{'max |Δ|':>10}")
    out = []
    for device, model in ((d, m) for d in devices for m in args.models.split(",")):
        r = bench(model, torch.device(device), images_n=n, chunk=args.chunk, repeats=repeats)
        out.append(r)
        print(f"{r['model']:<19}{r['device']:<8}{r['images']:>7}{r['chunk']:>6}{r['floor_s_per_image']:>12.4f}"
              f"{r['ours_s_per_image']:>11.4f}{r['quantus_s_per_image']:>14.4f}{r['quantus_over_ours']:>13.2f}"
              f"{r['ours_over_floor']:>11.3f}{r['max_abs_diff']:>10.1e}", flush=True)
        print(f"{'':<27}beyond the floor per image: ours {r['ours_overhead_s_per_image']:.4f} s, "
              f"Quantus {r['quantus_overhead_s_per_image']:.4f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
