"""Speed of the metric groups that re-run the method: Max-Sensitivity against Quantus's
`MaxSensitivity` and against its floor, ADCC against its floor.

    python -m benchmarks.sensitivity_speed                     # 4 photos, Grad-CAM, 3 repeats: ~2 min on 2 cores
    python -m benchmarks.sensitivity_speed --threads 1 --repeats 5
    python -m benchmarks.sensitivity_speed --images 64 --device cuda

EfficientNet-Lite0 with its real weights, scikit-image photos, each row's class = the class
predicted on it (so ADCC re-makes no map), the paper's settings (10 samples, noise ±0.2).
Contenders, interleaved in rotating order `--repeats` times so that another process's load falls
on all of them; every one includes making the map Φ(x) itself:

    ms        explain + compute(sensitivity): the noise, then all 10·B copies in one re-run
    quantus   explain + quantus.MaxSensitivity (same explain function, `unbounded=True`), its
              10 steps of B copies each
    ms_floor  11 runs of the method on the batch (Φ(x) and 10 copies; Quantus's defaults need no
              forward): what Max-Sensitivity cannot avoid
    adcc      explain + compute(adcc): clean forward, x ⊙ S forward, one re-run
    adcc_floor  2 runs of the method + 2 forwards of the batch

Printed: seconds per image per repeat, and the ratios ms / quantus (target ≤ 1), ms / ms_floor and
adcc / adcc_floor (their median and spread).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._stats import interleaved, spread
from opticam_core import explain, load_model
from opticam_core.metrics import compute

from .gradshap_speed import skimage_batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--method", default="gradcam")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 is steadier on a machine others share")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import quantus

    bundle = load_model("efficientnet_lite0", device=args.device)
    x = skimage_batch(args.images).to(args.device)
    with torch.no_grad():
        t = bundle.model(x).argmax(1)
    method, S = args.method, args.samples

    def make_map():
        return explain(bundle, x, t, method).maps

    def ms():
        compute(bundle, x, t, make_map(), which={"sensitivity": {"samples": S}}, method=method, clean_logits=logits)

    def explain_func(model, inputs, targets, **_):
        return explain(bundle, torch.from_numpy(np.asarray(inputs, dtype=np.float32)).to(args.device),
                       torch.as_tensor(targets, device=args.device), method, unbounded=True).maps.cpu().numpy()

    def quantus_ms():
        maps = make_map()
        metric = quantus.MaxSensitivity(nr_samples=S, lower_bound=0.2, disable_warnings=True)
        metric(model=bundle.model, x_batch=x.cpu().numpy(), y_batch=t.cpu().numpy(), a_batch=maps.cpu().numpy(),
               explain_func=explain_func, device=args.device, batch_size=len(x))

    def ms_floor():
        for _ in range(S + 1):
            make_map()

    def adcc():
        compute(bundle, x, t, make_map(), which={"adcc": {}}, method=method)

    def adcc_floor():
        maps = make_map()
        with torch.no_grad():
            bundle.model(x), bundle.model(x * maps[:, None])
        make_map()

    with torch.no_grad():
        logits = bundle.model(x)
    contenders = {"ms": ms, "quantus": quantus_ms, "ms_floor": ms_floor, "adcc": adcc, "adcc_floor": adcc_floor}
    make_map()  # warm-up
    names = list(contenders)
    print(f"{len(x)} photos, {method}, {S} samples, device {args.device}, {torch.get_num_threads()} threads")
    seconds, _ = interleaved(contenders, args.repeats, per=len(x), rotate=True, device=args.device,
                             after_repeat=lambda r, wall, _cpu: print(
                                 f"repeat {r}: " + "  ".join(f"{k} {wall[k][-1]:.3f}s" for k in names)))
    ratio = {"ms / quantus": ("ms", "quantus"), "ms / ms_floor": ("ms", "ms_floor"),
             "adcc / adcc_floor": ("adcc", "adcc_floor")}
    for label, (a, b) in ratio.items():
        print(f"{label:18s} {spread([u / v for u, v in zip(seconds[a], seconds[b])])}")
    for k in names:
        print(f"{k:18s} {spread(seconds[k])} s per image")


if __name__ == "__main__":
    main()
