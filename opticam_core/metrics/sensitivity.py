"""Max-Sensitivity (Yeh et al. 2019) as the paper ran it: Quantus 0.6 `MaxSensitivity` with
`nr_samples=10`, `lower_bound=0.2` and Quantus's other defaults, batched.

What Quantus computes per image x with map S = Φ(x) made for class c (the label it is given):

- n noisy copies x + εₛ, ε ~ U(−0.2, 0.2) drawn independently for every input element (all three
  channels; `batch_uniform_noise` with `upper_bound=None`), added to the array it is given and
  NOT clipped: copies leave the input's range;
- the method re-run on each copy for the same class c: Φ(x + εₛ);
- MS = maxₛ ‖Φ(x) − Φ(x + εₛ)‖_F / ‖Φ(x)‖_F: both norms on EXPLANATIONS (Quantus's
  `norm_denominator` takes `a_batch`; the formula "/‖x‖" sometimes quoted is not what it runs),
  Frobenius = L2 of the flattened map; `normalise=False`, `abs=False`, no NaN for a changed
  prediction (`return_nan_when_prediction_changes=False`), and the max ignores NaN ratios
  (`np.nanmax`): 0/0, where S and a copy's map are both all zeros.

Our choices where Quantus depends on its caller:

- Input space: the noise is added to [0,1] pixels, the space our bundles take (they normalise
  inside), as the paper's Quantus call received them (the Opti-CAM code normalises inside the
  model); ±0.2 is then ±20% of the pixel range. Copies are not clipped, as in Quantus (`clip=True`
  clips them to [0,1] instead; the methods are run with `unbounded=True` otherwise).
- Noise draws: Quantus draws from numpy's global RNG, so its numbers change with whatever ran
  before. Ours come from a CPU `torch.Generator` per image, seeded by `seed` and a hash of the
  image's content (its bytes, dtype and shape): the same image gets the same εₛ whatever the
  device, the batch it is in, its position there, or the global RNG state, so results do not
  depend on the batch size (which differs between CPU and GPU runs). `sensitivity_noise` returns
  them, for replaying into Quantus.
- S = 0 everywhere (a constant map under min–max normalisation) divides by 0 as Quantus does:
  MS = ∞ if a copy's map is not all zeros, NaN if every copy's is; `aggregate` leaves both out.
- A copy on which the method failed (`batch.rerun` gives NaN) makes the image's MS NaN (its
  reason goes to `metric_error`), rather than a max over fewer draws.

Cost: `samples` runs of the method per image (all n·B copies in one call on a GPU, B per call on a
CPU, unless `batch_size` says otherwise), no extra forward.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

from ..cost import Cost
from ..fields import PerImage
from ..options import Bool, NonNegativeFloat, NonNegativeInt, PositiveInt
from .classification import check_batch
from .registry import Metric, MetricBatch, register_group

NORMS = ("fro", "l2", "linf")


def _image_seed(image: torch.Tensor, seed: int) -> int:
    """A 63-bit seed from `seed` and the image's content (bytes, dtype, shape)."""
    data = image.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=False))
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def sensitivity_noise(images: torch.Tensor, *, samples: int = 10, lower_bound: float = 0.2,
                      seed: int = 0) -> torch.Tensor:
    """εₛ for each image: samples×B×C×H×W float32 on the CPU, uniform in [−lower_bound,
    lower_bound], from a generator per image seeded by `seed` and the image's content."""
    B = images.shape[0]
    out = torch.empty((samples, *images.shape), dtype=torch.float32)
    gen = torch.Generator()
    for j in range(B):
        gen.manual_seed(_image_seed(images[j], seed))
        u = torch.rand((samples, *images.shape[1:]), generator=gen, dtype=torch.float32)
        out[:, j] = u * (2 * lower_bound) - lower_bound
    return out


def _norm(flat: torch.Tensor, which: str) -> torch.Tensor:
    if which == "linf":
        return flat.abs().amax(-1)
    return flat.norm(dim=-1)  # "fro" and "l2" are the same number on a flattened map, as in Quantus


def max_sensitivity(rerun, images: torch.Tensor, maps: torch.Tensor, targets, *, samples: PositiveInt = 10,
                    lower_bound: NonNegativeFloat = 0.2, norm_numerator: Literal["fro", "l2", "linf"] = "fro",
                    norm_denominator: Literal["fro", "l2", "linf"] = "fro", clip: Bool = False,
                    seed: NonNegativeInt = 0, batch_size: PositiveInt | None = None) -> torch.Tensor:
    """MS per image (B, float64) of maps S (B×H×W) made for `targets` by the method that
    `rerun(images, targets, *, unbounded) -> maps` runs again; see the module docstring.

    samples: noisy copies per image (Quantus `nr_samples`; the paper: 10). lower_bound: the noise
    is U(−lower_bound, lower_bound) per pixel and channel, in [0,1] pixel space. norm_numerator,
    norm_denominator: the norms of Φ(x) − Φ(x + ε) and of Φ(x) ("fro" = "l2", or "linf"). clip:
    clip the copies to [0,1] (Quantus does not). seed: the noise's seed (with each image's
    content). batch_size: copies per call of the method (default: all samples·B in one call on
    a GPU; B, one draw of every image per call, on a CPU, where a call's time per image grows with
    its size: Grad-CAM on EfficientNet-Lite0 took ~1.5× longer per image in one call of 40 than in
    calls of 4 on a 2-core machine)."""
    home = images.device
    images, maps, targets = check_batch(None, images, maps, targets)
    B = images.shape[0]
    noise = sensitivity_noise(images, samples=samples, lower_bound=lower_bound, seed=seed)
    noisy = images[None] + noise.to(images.device, images.dtype)
    if clip:
        noisy = noisy.clamp(0, 1)
    noisy = noisy.reshape(samples * B, *images.shape[1:])
    classes = targets.repeat(samples)  # copy s·B + j is image j's s-th
    step = batch_size or (samples * B if images.device.type == "cuda" else B)
    again = torch.cat([rerun(noisy[i:i + step], classes[i:i + step], unbounded=not clip)
                       for i in range(0, samples * B, step)])
    with torch.no_grad():
        again = again.detach().to(images.device, torch.float64).reshape(samples, B, -1)
        base = maps.to(torch.float64).reshape(B, -1)
        ratio = _norm(base[None] - again, norm_numerator) / _norm(base, norm_denominator)[None]
        failed = torch.isnan(again).any(-1).any(0)
        best = torch.where(torch.isnan(ratio), float("-inf"), ratio).amax(0)
        best = torch.where(torch.isnan(ratio).all(0) | failed, float("nan"), best)
    return best.to(home)


def _cost(options) -> Cost:
    return Cost(reruns=options.samples, note="no forward of its own")


@register_group(
    "sensitivity", options_from=max_sensitivity, calls_method=True, cost=_cost,
    fields=(PerImage("max_sensitivity", "float64",
                     "max over noisy copies x+ε of ‖Φ(x) − Φ(x+ε)‖ / ‖Φ(x)‖ (Quantus MaxSensitivity)"),),
    metrics=(Metric("MS", "max-sensitivity", higher_is_better=False, percent=False),))
def _sensitivity(batch: MetricBatch, **options) -> dict[str, torch.Tensor]:
    return {"max_sensitivity": max_sensitivity(batch.rerun, batch.images, batch.maps, batch.made_for, **options)}


__all__ = ["NORMS", "max_sensitivity", "sensitivity_noise"]
