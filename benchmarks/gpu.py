"""GPU throughput: every method's images/s per precision, compiled or not, against its floor; the
Ray job against the same work in-process; and the per-model throughput table `--check` reads.

    python -m benchmarks.gpu                          # ResNet50 and ViT-B at batch 64 (under 8 min on one GPU)
    python -m benchmarks.gpu --tiny                   # tiny timm models, 2 images: runs on a CPU (the tests)
    python -m benchmarks.gpu --out FILE --no-job      # the table elsewhere; skip the Ray job comparison

Per model and precision (fp32, tf32, bf16; `opticam_core.precision`) the model's pass times are
measured at the batch size: a forward under no_grad, and a forward plus a backward to the
input. A method's floor is its declared cost (`method_spec(key).cost_of(options, info)`, shared
passes paid in: what `explain` of that method alone runs) in those times: forwards × forward +
backwards × (forward+backward − forward), per image. ratio = measured / floor: 1.0 is a method
that does nothing but its passes; what is above it is Python between the passes, small chunks,
CPU work (LIME's superpixels, TIBAV's LRP). Below 1: a backward that stops at the target layer
(the gradient CAMs) is cheaper than the floor's backward to the input; the compiled figures
are against the eager floor.

The heavy methods run at reduced settings so that the whole fits the time budget (`--budget`,
default 420 s for the whole run): their images/s are at those settings (printed with them); the ratio is what
carries over to the paper's settings. Score-CAM, Ablation-CAM and LIME run on 8 of the 64 images
(their cost per image is fixed by K or by the samples, not by the batch). Measurements run in
priority order (eager at every precision, then the Ray job, then compiled) and whatever does not
fit the budget is reported as skipped. The models run with random weights (`--weights` to load
some): the GPU machine has no network, and the speed does not depend on the weights.

The table (`--out`, default benchmarks/throughput.json): per model and precision, the seconds
of one forward-equivalent (a forward; a backward counts as two) of one image, taken as
max(forward, (forward+backward) / 3) per image, with the device's name and the date; plus the
pass times and every method's figures. `opticam run --check` reads it for the GPU-hours
(pipeline/throughput.py).

Compile and precision are `explain` keywords: where this checkout's `explain` lacks them, the
script says so and measures fp32, eager only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import time
from pathlib import Path

import torch

from benchmarks._stats import sync, timeit
from opticam_core import explain, load_model
from opticam_core.cost import model_info
from opticam_core.methods import REGISTRY
from opticam_core.methods.registry import method_spec

MODELS = {"resnet50": "layer4", "vit_base_patch16_224": "blocks.11.norm1"}
TINY_MODELS = {"test_efficientnet": "bn2", "test_vit": "blocks.1.norm1"}
#: tiny inputs: the CNN at 64×64; timm's test_vit has a fixed position embedding for 160×160
TINY_SIZE = {"test_efficientnet": (64, 64), "test_vit": (160, 160)}

#: Settings of the heavy methods (see the docstring); Opti-CAM at the paper's 100 iterations (issue
#: 14's target: ≥ 200 images/s on ResNet50).
OPTIONS = {"opticam": {"iterations": 100}, "extremal": {"areas": [0.1], "iterations": 100},
           "lime": {"num_samples": 200}}
TINY_OPTIONS = {"opticam": {"iterations": 3}, "extremal": {"areas": [0.1], "iterations": 2},
                "lime": {"num_samples": 8, "quickshift_kernel_size": 2.0}, "gradshap": {"n_samples": 2}}
#: methods measured on fewer images than the batch (their cost per image does not depend on it)
FEW = {"scorecam": 8, "ablationcam": 8, "lime": 8}
PRECISIONS = ("fp32", "tf32", "bf16")
#: seconds the eager measurements leave for the Ray job comparison (Ray's start, the actor's model load)
JOB_RESERVE = 120.0


def explain_keywords() -> set[str]:
    return set(inspect.signature(explain).parameters)


def photos(n: int, size: tuple[int, int], device) -> torch.Tensor:
    """`n` images in [0,1]: skimage's photos resized, cycled (random pixels if skimage lacks them)."""
    try:
        from skimage import data

        arrays = [getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")]
        base = torch.stack([torch.nn.functional.interpolate(
            torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255, size=size, mode="bilinear",
            antialias=True, align_corners=False)[0] for a in arrays]).clamp(0, 1)
    except Exception:  # noqa: BLE001  (a speed measurement: any pixels will do)
        base = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(0))
    return base[torch.arange(n) % base.shape[0]].to(device)


def precision_context(name: str, model, compile: bool = False):
    if name == "fp32" and not compile:
        return contextlib.nullcontext()
    from opticam_core.precision import precision

    return precision(name, model, compile=compile)


@dataclasses.dataclass
class Passes:
    forward: float           # seconds per image, no_grad
    forward_backward: float  # seconds per image, a forward and a backward to the input

    @property
    def backward(self) -> float:
        return max(self.forward_backward - self.forward, 0.0)

    @property
    def per_equivalent(self) -> float:
        return max(self.forward, self.forward_backward / 3)


def measure_passes(bundle, x, t, name: str, repeat: int) -> Passes:
    n = x.shape[0]

    def forward():
        with torch.no_grad():
            bundle.model(x)

    def forward_backward():
        xi = x.detach().requires_grad_(True)
        y = bundle.model(xi).gather(1, t[:, None]).sum()
        torch.autograd.grad(y, xi)

    with precision_context(name, bundle.model):
        f = timeit(forward, x.device, repeat) / n
        fb = timeit(forward_backward, x.device, repeat) / n
    return Passes(f, fb)


def floor_seconds(key: str, options: dict, info, passes: Passes, n: int) -> float:
    cost = method_spec(key).cost_of(options, info).standalone()
    return n * (cost.forwards * passes.forward + cost.backwards * passes.backward)


class Budget:
    """Seconds left of the whole run; `reserve`: what a later, higher-priority part keeps back."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.reserve = 0.0
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, needs: float) -> bool:
        if self.left() - self.reserve >= needs:
            return True
        self.skipped.append(what)
        return False


def run_methods(bundle, info, x, t, options: dict, passes: dict[str, Passes], precisions, compiled: bool,
                budget: Budget, repeat: int, printer, results: dict, keywords: set[str], few: dict) -> None:
    """img/s and ratio to floor of every method `bundle` serves, at each precision, into `results`."""
    mode = "compiled" if compiled else "eager"
    for prec in precisions:
        printer(f"  {prec}, {mode}:")
        for key in sorted(k for k, s in REGISTRY.items() if s.serves(bundle)):
            n = min(few.get(key, x.shape[0]), x.shape[0])
            opts = dict(options.get(key, {}))
            floor = floor_seconds(key, opts, info, passes[prec], n)
            # warm-up + timed calls, at least the floor each; a compile takes its own time
            if not budget.allows(f"{bundle.name} {key} {prec} {mode}", 3 * floor + (60 if compiled else 0)):
                continue
            kw = {}
            if "precision" in keywords:
                kw["precision"] = prec
            if compiled:
                kw["compile"] = True
            try:
                seconds = timeit(lambda: explain(bundle, x[:n], t[:n], key, **kw, **opts), x.device,
                                 repeat if floor < 1 else 1)
            except Exception as err:  # noqa: BLE001  (one method's failure must not cost the others' figures)
                printer(f"    {key:<12} failed: {type(err).__name__}: {str(err)[:200]}")
                results.setdefault(prec, {}).setdefault(mode, {})[key] = {"error": f"{type(err).__name__}: {err}"}
                continue
            row = {"img_per_s": n / seconds, "ratio": seconds / floor if floor else None, "images": n,
                   "options": opts, "seconds": seconds, "floor_seconds": floor}
            results.setdefault(prec, {}).setdefault(mode, {})[key] = row
            ratio = f"{row['ratio']:5.2f}× floor" if row["ratio"] else "  (no floor)"
            printer(f"    {key:<12} {row['img_per_s']:9.1f} img/s  {ratio}  ({n} images"
                    + (f", {opts}" if opts else "") + ")")


def in_process(rows, cfg) -> tuple[float, float]:
    """benchmarks.pipeline.in_process with the Evaluator built as the job builds it (the model's
    weights and layer, the precision): (seconds, median seconds per batch)."""
    import pyarrow as pa

    from benchmarks.pipeline import per_batch
    from pipeline.config import load_config
    from pipeline.evaluate import Evaluator
    from pipeline.schema import SAMPLES

    c = load_config(cfg, run_id="inproc")
    m = c.models[0]
    extra = {k: getattr(c.compute, k) for k in ("precision", "compile") if hasattr(c.compute, k)}
    t0 = time.perf_counter()
    ev = Evaluator(run_id="inproc", dataset="bench", model={"name": m.name, "key": m.key, **m.load_kwargs()},
                   methods=c.methods_for(m), metrics=c.metrics, save_maps=c.save_maps,
                   threads=int(c.compute.cpus_per_actor), **extra)
    table = pa.Table.from_pylist(rows, schema=SAMPLES)
    starts = []
    for start in range(0, len(rows), c.compute.batch_size):
        starts.append(time.perf_counter())
        ev(table.slice(start, c.compute.batch_size))
    sync(ev.device)
    return time.perf_counter() - t0, per_batch(starts)


def job_vs_inprocess(model: str, layer: str | None, weights: str | None, images: int, batch: int, iterations: int,
                     steps: int, precision: str, printer) -> dict:
    """The Ray job's img/s against the same Evaluator called in-process (benchmarks.pipeline)."""
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from benchmarks import pipeline as bp
    from pipeline.config import ComputeSpec
    from pipeline.job import local_cpus
    from pipeline.schema import SAMPLES

    gpu = torch.cuda.is_available()
    args = argparse.Namespace(model=model, iterations=iterations, steps=steps, batch=batch,
                              cpus_per_actor=4 if gpu else 1)
    work = Path(tempfile.mkdtemp(prefix="opticam-gpu-bench-"))
    try:
        rows = bp.sample_rows(images)
        (work / "samples").mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), work / "samples" / "part-0.parquet",
                       row_group_size=batch)
        cfg = bp.config(str(work / "samples"), str(work / "out"), args, actors=1)
        cfg["models"][0].update(weights=weights, layer=layer)
        if gpu:
            cfg["compute"]["gpus_per_actor"] = 1
        if "precision" in ComputeSpec.model_fields:
            cfg["compute"]["precision"] = precision
        base, base_batch = in_process(rows, cfg)
        ray.init(num_cpus=local_cpus(), include_dashboard=False, ignore_reinit_error=True)
        try:
            job = bp.ray_job(cfg, "gpu-bench")
            job_batch = bp.per_batch(bp.job_batch_starts(cfg["output"], "gpu-bench"))
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"images": len(rows), "batch": batch, "model": model, "methods": list(cfg["methods"]),
           "metrics": list(cfg["metrics"]), "in_process_img_per_s": len(rows) / base,
           "job_img_per_s": len(rows) / job, "in_process_s_per_batch": base_batch, "job_s_per_batch": job_batch}
    printer(f"Ray job vs in-process ({model}, {len(rows)} images, batch {batch}, methods {out['methods']}, "
            f"metrics {out['metrics']}{', ' + precision if 'precision' in cfg['compute'] else ''}):")
    printer(f"  in-process {out['in_process_img_per_s']:8.2f} img/s ({base_batch:.2f} s per batch); "
            f"Ray job {out['job_img_per_s']:8.2f} img/s ({job_batch:.2f} s per batch) = "
            f"{base / job:.0%} end to end, {base_batch / job_batch:.0%} per batch")
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny timm models, 2 images, few iterations (CPU, tests)")
    p.add_argument("--batch", type=int, help="images per call (default 64; --tiny: 2)")
    p.add_argument("--models", nargs="+", help="model names (built-ins or timm/torchvision with --layers)")
    p.add_argument("--layers", nargs="+", help="one target layer per model (default: the built-ins')")
    p.add_argument("--weights", default=None, help="weights to load (default: random; the speed is the same)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: all three (CPU: fp32, bf16)")
    p.add_argument("--compile", choices=("off", "on", "both"), help="off: eager only; on: compiled only, every precision; both (the default; --tiny: off): "
                        "eager at every precision, compiled at the fastest")
    p.add_argument("--no-job", action="store_true", help="skip the Ray job vs in-process comparison")
    p.add_argument("--job-images", type=int, help="images of the Ray job comparison (default 256; --tiny: 4)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole run (measurements that would not fit are skipped and listed)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls of a fast measurement (median)")
    p.add_argument("--out", help="the throughput table (default benchmarks/throughput.json; --tiny: none, "
                                 "so that a CPU run never replaces a GPU's table)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    keywords = explain_keywords()
    models = dict(zip(args.models, args.layers or [None] * len(args.models))) if args.models else \
        dict(TINY_MODELS if args.tiny else MODELS)
    batch = args.batch or (2 if args.tiny else 64)
    options = TINY_OPTIONS if args.tiny else OPTIONS
    few = {k: 1 for k in FEW} if args.tiny else FEW
    precisions = list(args.precisions or (PRECISIONS if device.type == "cuda" else ("fp32", "bf16")))
    if "precision" not in keywords:
        print("note: this checkout's explain() has no `precision` keyword: fp32 only")
        precisions = ["fp32"]
    compile_mode = args.compile or ("off" if args.tiny else "both")
    if compile_mode != "off" and "compile" not in keywords:
        print("note: this checkout's explain() has no `compile` keyword: eager only")
        compile_mode = "off"
    if device.type == "cpu" and "tf32" in precisions:
        print("note: tf32 changes nothing on a CPU (it is fp32 there)")
    budget = Budget(args.budget)
    budget.reserve = 0.0 if args.no_job else JOB_RESERVE
    name = device_name(device)
    print(f"{name}; torch {torch.__version__}; batch {batch}; precisions {precisions}; compile {compile_mode}")

    lines: list[str] = []

    def printer(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    table = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
             "batch": batch, "tiny": bool(args.tiny), "weights": args.weights,
             "seconds_per_equivalent": {}, "passes": {}, "methods": {}}
    loaded = {}
    for model, layer in models.items():
        bundle = load_model(model, weights=args.weights, layer=layer, device=device)
        if args.tiny and model in TINY_SIZE:
            bundle.input_size = TINY_SIZE[model]
        info = dataclasses.replace(model_info(model, layer), input_size=tuple(bundle.input_size))
        x = photos(batch, tuple(bundle.input_size), device)
        with torch.no_grad():
            t = bundle.model(x).argmax(1)
        passes = {}
        for prec in precisions:
            passes[prec] = measure_passes(bundle, x, t, prec, args.repeat)
        table["passes"][model] = {k: dataclasses.asdict(v) for k, v in passes.items()}
        table["seconds_per_equivalent"][model] = {k: v.per_equivalent for k, v in passes.items()}
        printer(f"{model} (layer {bundle_layer(bundle, layer)}, {info.gflops or float('nan'):.2f} GFLOP per forward, "
                f"{tuple(bundle.input_size)}): per image " + "; ".join(
                    f"{k} forward {v.forward * 1e3:.3f} ms, forward+backward {v.forward_backward * 1e3:.3f} ms"
                    for k, v in passes.items()))
        results = table["methods"].setdefault(model, {})
        if compile_mode != "on":
            run_methods(bundle, info, x, t, options, passes, precisions, False, budget, args.repeat, printer,
                        results, keywords, few)
        loaded[model] = (bundle, info, x, t, passes)

    budget.reserve = 0.0
    if not args.no_job and budget.allows("the Ray job comparison", 0 if args.tiny else JOB_RESERVE / 2):
        model = next(iter(models))
        try:
            tiny = args.tiny
            table["job"] = job_vs_inprocess(
                model, models[model], args.weights, images=args.job_images or (4 if tiny else 256),
                batch=2 if tiny else batch, iterations=3 if tiny else 20, steps=4 if tiny else 56,
                precision="bf16" if "bf16" in precisions else precisions[0], printer=printer)
        except Exception as err:  # noqa: BLE001  (the method figures are written whatever happens here)
            printer(f"Ray job vs in-process failed: {type(err).__name__}: {str(err)[:300]}")
            table["job"] = {"error": f"{type(err).__name__}: {err}"}

    if compile_mode in ("on", "both"):
        fastest = [p for p in ("bf16", "tf32", "fp32") if p in precisions][:1]
        for model, (bundle, info, x, t, passes) in loaded.items():
            printer(f"{model}, compiled (torch.compile of the network's forward):")
            run_methods(bundle, info, x, t, options, passes, fastest if compile_mode == "both" else precisions,
                        True, budget, args.repeat, printer, table["methods"][model], keywords, few)

    best = [(row["img_per_s"], prec, mode) for prec, modes in table["methods"].get("resnet50", {}).items()
            for mode, rows in modes.items() for key, row in rows.items() if key == "opticam" and "img_per_s" in row]
    if best:
        rate, prec, mode = max(best)
        printer(f"Opti-CAM on ResNet50, {OPTIONS['opticam']['iterations']} iterations: {rate:.1f} img/s at best "
                f"({prec}, {mode}); issue 14's target on an H100-class GPU: >= 200 img/s")
    if budget.skipped:
        printer(f"skipped for the time budget ({args.budget:.0f} s): {', '.join(budget.skipped)}")
    table["skipped"] = budget.skipped
    table["seconds"] = time.perf_counter() - t_start
    out = args.out if args.out is not None else (None if args.tiny else os.path.join("benchmarks", "throughput.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(table, indent=1, default=str))
        printer(f"wrote {out} ({table['seconds']:.0f} s in all)")
    return table


def bundle_layer(bundle, layer) -> str:
    return layer or getattr(bundle, "layer", None) or "?"


if __name__ == "__main__":
    main()
