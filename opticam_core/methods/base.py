"""What every method shares: the result type, the registry, and the per-call context that lets
several methods asked together reuse one forward (and one backward) pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import BaseModel

from ..chunking import loop_chunk
from ..hooks import capture
from ..models import ModelBundle
from ..options import as_json, as_kwargs
from .registry import REGISTRY


@dataclass
class Explanation:
    """Saliency maps of one method for a batch.

    maps: B×H×W in [0,1]. extras: per-image tensors with B rows (always `constant`, True where
    the raw map was constant: under min–max normalisation, every CAM's, it became zeros; Opti-CAM
    with `max` gives zeros too, with `sigmoid` σ of the constant; method-specific diagnostics
    besides, e.g. Opti-CAM's B×iterations `objective_history`; every extra is declared in the
    method's registration). seconds: wall time of the method on this batch, including its share
    of passes it reused. options: every option's value (defaults filled in), as JSON values.
    """

    method: str
    maps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def to(self, device) -> "Explanation":
        self.maps = self.maps.to(device)
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        return self


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Context:
    """One batch of one `explain` call. Computes the shared passes lazily, each at most once.

    - `logits()`: clean logits, B×classes.
    - `features()`: feature maps A at the target layer, B×K×h×w, detached.
    - `gradients()`: (A, ∂y_c/∂A) from one forward and one backward (A is also served to
      `features()`).
    Each pass's time is charged to every method that uses it (`charge`).
    """

    def __init__(self, bundle: ModelBundle, images: torch.Tensor, targets: torch.Tensor):
        self.bundle = bundle
        self.model = bundle.model
        self.images = images
        self.targets = targets
        self.size = tuple(images.shape[-2:])
        self.device = images.device
        self._cache: dict[str, object] = {}
        self._cost: dict[str, float] = {}
        self.used: set[str] = set()

    def _get(self, key: str, compute: Callable[[], object]):
        if key not in self._cache:
            _sync(self.device)
            t0 = time.perf_counter()
            self._cache[key] = compute()
            _sync(self.device)
            self._cost[key] = time.perf_counter() - t0
        self.used.add(key)
        return self._cache[key]

    def shared_seconds(self) -> float:
        return sum(self._cost[k] for k in self.used)

    # -- the passes ----------------------------------------------------------------------

    def _forward_features(self):
        with torch.no_grad(), capture(self.bundle.target) as cap:
            logits = self.model(self.images)
        raw = self._own_dtype(cap.output)
        return logits, self.bundle.features(raw), raw

    def _pass(self):
        """The richest pass computed so far (the backward also yields features and logits)."""
        if "gradients" in self._cache:
            feats, _, logits, raw = self._get("gradients", self._backward)
            return logits, feats, raw
        return self._get("forward", self._forward_features)

    def logits(self) -> torch.Tensor:
        return self._pass()[0]

    def features(self) -> torch.Tensor:
        return self._pass()[1]

    def raw_features(self) -> torch.Tensor:
        """The target layer's output before any token reshape (Ablation-CAM ablates it)."""
        return self._pass()[2]

    def _backward(self):
        with torch.enable_grad(), capture(self.bundle.target, as_leaf=True) as cap:
            logits = self.model(self.images)
            score = logits.gather(1, self.targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, cap.output)
        raw = self._own_dtype(cap.output.detach())
        return self.bundle.features(raw), self.bundle.features(self._own_dtype(grad)), logits.detach(), raw

    def _own_dtype(self, t: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast (`opticam_core.precision`) captured activations are bfloat16; the
        # maps are made in the images' dtype. A no-op (the same tensor) otherwise.
        return t.to(self.images.dtype) if t.is_floating_point() and t.dtype != self.images.dtype else t

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        feats, grads, _, _ = self._get("gradients", self._backward)
        return feats, grads

    def chunk(self, default_cpu: int, default_gpu: int, requested: int | None, *, total: int | None = None,
              copies: float = 2.0, grad: bool = False, fn=None, example: torch.Tensor | None = None,
              what: str = "forward") -> int:
        """`loop_chunk` for this context's model, on its images unless `example` is given."""
        return loop_chunk(self.model, self.images if example is None else example, default_cpu, default_gpu,
                          requested, total=total, copies=copies, grad=grad, fn=fn, what=what)


def run_method(key: str, ctx: Context, options: BaseModel) -> Explanation:
    """Run method `key` with its validated `options`; its extras must be the declared ones."""
    spec = REGISTRY[key]
    ctx.used = set()
    _sync(ctx.device)
    t0 = time.perf_counter()
    cached_before = dict(ctx._cost)
    maps, extras = spec.fn(ctx, **as_kwargs(options))
    _sync(ctx.device)
    undeclared = sorted(set(extras) - spec.extra_names)
    if undeclared:
        # An undeclared extra would never reach the result rows; fail where the method is written.
        raise RuntimeError(f"method {key!r} emits undeclared extras {undeclared}; declare them in its register()")
    elapsed = time.perf_counter() - t0
    # Passes computed inside this call are already in `elapsed`; passes reused from an earlier
    # method are charged here too, so each method's seconds read as if it ran alone.
    reused = sum(cost for k, cost in ctx._cost.items() if k in ctx.used and k in cached_before)
    return Explanation(method=key, maps=maps.detach(), extras=extras, seconds=elapsed + reused,
                       options=as_json(options))
