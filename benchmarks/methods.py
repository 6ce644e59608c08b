"""Speed of every saliency method as time over its floor, and against pytorch-grad-cam and TorchRay.

    python -m benchmarks.methods                  # EfficientNet-Lite0 and ResNet50, batch 8, CPU (+ GPU)
    python -m benchmarks.methods --quick          # fewer iterations / channels, minutes instead of an hour

The floor of a method is the forwards and backwards its algorithm cannot avoid, timed in the same
run on the same batch: gradient CAMs one forward + backward; Opti-CAM and extremal perturbation
`iterations` × (forward + backward to the input); Score-CAM K masked forwards per image (run in
the chunk size Score-CAM itself uses). Ablation-CAM is compared with pytorch-grad-cam's
AblationCAM, which runs K full forwards per image where ours runs only the network's tail.
Extremal perturbation's default path and exact path (`torchray_ops`) are also compared with
TorchRay's, run one photo at a time on the same photos (`benchmarks.extremal_speed` measures
that ratio interleaved and repeated).
Targets (issue 2): Opti-CAM ≤ 1.2× floor; the five gradient CAMs together ≤ 1.3× one Grad-CAM;
Score-CAM ≤ 1.15× floor; Ablation-CAM ≥ 10× faster than pytorch-grad-cam's; extremal's default
path ≤ 0.6× TorchRay's time.
"""

from __future__ import annotations

import argparse
import contextlib
import io

import torch

from benchmarks._stats import timeit
from opticam_core import explain, load_model
from opticam_core.methods import GRADIENT_METHODS


def forward_backward(bundle, x, t):
    """One forward and one backward to the input: the unit of Opti-CAM's and extremal's cost."""
    def step():
        xi = x.detach().requires_grad_(True)
        y = bundle.model(xi).gather(1, t[:, None]).sum()
        torch.autograd.grad(y, xi)
    return step


def forwards(bundle, x, n_images: int, chunk: int):
    """`n_images` plain no-grad forwards in chunks of `chunk` (Score-CAM's floor)."""
    def run():
        with torch.no_grad():
            done = 0
            while done < n_images:
                k = min(chunk, n_images - done)
                bundle.model(x[:1].expand(k, -1, -1, -1) * 0.5)
                done += k
    return run


def row(name, seconds, images, floor=None, target=None):
    ratio = f"{seconds / floor:6.2f}x" if floor else "     -"
    tgt = target or ""
    return f"  {name:<34} {images / seconds:9.2f} img/s  {seconds:9.3f} s  floor {floor or 0:9.3f} s  {ratio}  {tgt}"


def photos(batch: int, device) -> torch.Tensor:
    """Real photos (the demo's, shipped in installed packages), so that channel activity, and
    with it what Score-CAM can skip, is that of real images, not of noise."""
    from opticam_core.metrics import preprocess
    from pipeline.demo.samples import demo_rows
    from pipeline.images import decode_image

    rows = demo_rows()
    return torch.stack([preprocess(decode_image(rows[i % len(rows)]["image"])) for i in range(batch)]).to(device)


def bench_model(name, bundle, device, batch, args):
    x = photos(batch, device)
    with torch.no_grad():
        t = bundle.model(x).argmax(1)
    print(f"\n{name} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"batch {batch}, 224x224, torch threads {torch.get_num_threads()}")
    fb = timeit(forward_backward(bundle, x, t), device)
    print(row("floor: 1 forward + backward", fb, batch))

    # Gradient CAMs: one pass serves all five.
    one = timeit(lambda: explain(bundle, x, t, "gradcam"), device)
    five = timeit(lambda: explain(bundle, x, t, list(GRADIENT_METHODS)), device)
    print(row("gradcam", one, batch, fb, "(floor: fwd+bwd)"))
    print(row("5 gradient CAMs together", five, batch, one, "target <= 1.3x one Grad-CAM"))
    print(row("fakecam", timeit(lambda: explain(bundle, x, t, "fakecam"), device), batch))

    # Opti-CAM: iterations × (forward + backward to the input).
    it = args.iterations
    opt = timeit(lambda: explain(bundle, x, t, "opticam", iterations=it), device, repeat=1)
    print(row(f"opticam ({it} iterations)", opt, batch, it * fb, "target <= 1.2x"))

    # Extremal perturbation: the same unit per iteration; both paths, and TorchRay one photo at a time.
    eit = args.extremal_iterations
    ext = timeit(lambda: explain(bundle, x, t, "extremal", iterations=eit), device, repeat=1, warmup=0)
    exact = timeit(lambda: explain(bundle, x, t, "extremal", iterations=eit, torchray_ops=True), device,
                   repeat=1, warmup=0)
    peer = timeit(torchray_one_by_one(bundle, x, t, eit), device, repeat=1, warmup=0) if args.peers else None
    print(row(f"extremal ({eit} iterations)", ext, batch, eit * fb,
              (f"{ext / peer:.2f}x TorchRay's time " if peer else "") + "(target <= 0.6x TorchRay's)"))
    print(row(f"extremal exact ({eit} iterations)", exact, batch, eit * fb,
              (f"{exact / peer:.2f}x TorchRay's time " if peer else "") + "(torchray_ops)"))
    if peer:
        print(row("peer TorchRay extremal, 1 by 1", peer, batch, eit * fb))

    # Score-CAM: K masked forwards per image, on `scorecam_images` images (it is the slow one).
    n = min(args.scorecam_images, batch)
    xs, ts = x[:n], t[:n]
    with torch.no_grad():
        from opticam_core.hooks import capture
        with capture(bundle.target) as cap:
            bundle.model(xs[:1])
        K = bundle.features(cap.output).shape[1]
    from opticam_core.chunking import loop_chunk
    from opticam_core.methods.perturbation import CPU_CHUNK, GPU_CHUNK

    chunk = loop_chunk(bundle.model, xs, CPU_CHUNK, GPU_CHUNK, total=n * K, copies=2.5)  # Score-CAM's own
    floor_sc = timeit(forwards(bundle, xs, n * K, chunk), device, repeat=1)
    sc = timeit(lambda: explain(bundle, xs, ts, "scorecam"), device, repeat=1)
    print(row(f"scorecam ({n} images x {K} channels)", sc, n, floor_sc,
              "target <= 1.15x (constant channels are one shared forward)"))

    abl = timeit(lambda: explain(bundle, xs, ts, "ablationcam"), device, repeat=1)
    print(row(f"ablationcam ({n} images, tail={'yes' if bundle.tail else 'no'})", abl, n, floor_sc,
              "(floor: K full forwards, what the peer runs)"))
    if args.peers:
        peer_rows(bundle, xs, ts, device, n, sc, abl)


def torchray_one_by_one(bundle, x, t, iterations):
    """TorchRay's extremal_perturbation, one photo after the other (area 0.1 and its other
    defaults, as ours)."""
    import warnings

    from torchray.attribution.extremal_perturbation import extremal_perturbation

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchRay's deprecated meshgrid call
            for i in range(len(x)):
                extremal_perturbation(bundle.model, x[i:i + 1], int(t[i]), max_iter=iterations)
    return run


def peer_rows(bundle, x, t, device, n, ours_sc, ours_abl):
    """pytorch-grad-cam on the same model (normalisation inside) and input."""
    import copy

    from pytorch_grad_cam import AblationCAM, GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = copy.deepcopy(bundle.model)
    for p in model.parameters():
        p.requires_grad_(True)  # the peer needs grads to register its hooks
    layer = [model.get_submodule(bundle.layer)]
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    for cls, ours, label in ((ScoreCAM, ours_sc, "scorecam"), (AblationCAM, ours_abl, "ablationcam")):
        cam = cls(model=model, target_layers=layer)
        cam.batch_size = 32
        with contextlib.redirect_stderr(io.StringIO()):  # the peer's progress bars
            seconds = timeit(lambda: cam(input_tensor=x, targets=targets), device, repeat=1, warmup=0)
        print(f"  peer pytorch-grad-cam {label:<12} {n / seconds:9.2f} img/s  {seconds:9.3f} s"
              f"  ours is {seconds / ours:6.1f}x faster")
    g = GradCAM(model=model, target_layers=layer)
    seconds = timeit(lambda: g(input_tensor=x, targets=targets), device)
    print(f"  peer pytorch-grad-cam gradcam      {n / seconds:9.2f} img/s  {seconds:9.3f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iterations", type=int, default=100, help="Opti-CAM iterations")
    p.add_argument("--extremal-iterations", type=int, default=50)
    p.add_argument("--scorecam-images", type=int, default=1, help="images for Score-CAM/Ablation-CAM")
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    p.add_argument("--quick", action="store_true", help="20 Opti-CAM, 10 extremal iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.extremal_iterations = 20, 10
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for dev in devices:
        device = torch.device(dev)
        for name in args.models:
            bundle = load_model(name, weights="default" if name == "efficientnet_lite0" else None, device=device)
            bench_model(name, bundle, device, args.batch, args)


if __name__ == "__main__":
    main()
