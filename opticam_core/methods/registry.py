"""The method registry: a method is one function plus one declaration, and everything else derives.

    @register("gradcam", name="Grad-CAM", family="gradient", rank=10)
    def gradcam(ctx: Context, *, eps: PositiveFloat = 1e-7): ...

The declaration gives the key (`explain`'s and the run config's), the display name, the family,
the paper's row name, the rank (the paper's table order), and the per-image extras the method
emits beyond `constant`. The options are the function's keyword-only parameters: their
annotations are the typed schema (`opticam_core.options`), their defaults the defaults.

From the registry derive: `METHODS` (in rank order), the families (`GRADIENT_METHODS`, …), the
report's row order and names, and the extras columns of the job's results. Adding a method is
one module and one import in `methods/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from ..cost import declared
from ..fields import PerImage
from ..options import Configurable, options_model

FAMILIES = {
    "reference": "a sanity baseline, not an explanation",
    "gradient": "weights from ∂y_c/∂A; one forward and one backward serve them all",
    "perturbation": "weights from forwards of perturbed inputs or features",
    "optimisation": "a mask optimised per image by gradient steps",
    "surrogate": "a local model fitted to the network's outputs on perturbed samples (LIME)",
    "attribution": "per-pixel attributions from gradients with respect to the input (GradientSHAP)",
    "attention": "read from a transformer's attention (ViT/DeiT only)",
}

@dataclass(frozen=True)
class Requirement:
    """What a method needs of the model (e.g. attention blocks), told from a loaded bundle, and,
    where it can be, from the model's recipe before anything is built, so that a run config
    pairing the method with a model it cannot serve is refused at `--check`."""

    name: str
    accepts: str                                   # the models that qualify, as errors name them
    serves: Callable[[Any], bool]                  # ModelBundle → bool
    serves_recipe: Callable[[Any], bool | None]    # models.Recipe → bool, or None: cannot tell yet


#: Every method emits this extra (SPEC §1's constant-map rule).
CONSTANT = PerImage("constant", "bool", "the raw map was constant and became zeros")


@dataclass(frozen=True)
class MethodSpec(Configurable):
    key: str
    name: str                        # display name (report rows, figures)
    family: str
    paper_name: str                  # the row name in the paper's tables
    rank: int                        # position in the paper's tables (report order)
    fn: Callable
    options: type[BaseModel]         # the typed schema of the keyword-only options
    extras: tuple[PerImage, ...]     # per-image extras, `constant` first
    requires: Requirement | None = None
    cost: Callable | None = None     # (options, ModelInfo | None) → cost.Cost; see `cost_of`

    def cost_of(self, options=None, info=None):
        """Model evaluations per image (`opticam_core.cost.Cost`) with these options (dict or
        validated) on a model described by `info` (`cost.ModelInfo`, None: unknown)."""
        if self.cost is None:
            raise ValueError(f"method {self.key!r} declares no cost; add cost= to its register()")
        opts = options if isinstance(options, BaseModel) else self.validate(options)
        return self.cost(opts, info)

    def serves(self, bundle) -> bool:
        return self.requires is None or bool(self.requires.serves(bundle))

    def check_serves(self, bundle) -> None:
        """ModelError naming the models this method accepts, when `bundle` is not one of them."""
        if not self.serves(bundle):
            from ..models import ModelError

            raise ModelError(f"{self.key} needs {self.requires.name}, which {bundle.name!r} does not have; "
                             f"it accepts {self.requires.accepts}")

    @property
    def where(self) -> str:
        return self.key

    @property
    def extra_names(self) -> frozenset[str]:
        return frozenset(e.name for e in self.extras)


REGISTRY: dict[str, MethodSpec] = {}


def register(key: str, *, name: str, family: str, rank: int, paper_name: str | None = None,
             extras: tuple[PerImage, ...] = (), requires: Requirement | None = None, cost=None):
    """Declare `fn(ctx, *, options…) -> (maps B×H×W, extras)` as method `key`.
    cost: its model evaluations per image (`opticam_core.cost`): a Cost, or a callable of the
    validated options, or of (options, ModelInfo | None) where the count depends on the network."""
    if family not in FAMILIES:
        raise ValueError(f"{key}: unknown family {family!r}; valid: {', '.join(FAMILIES)}")

    def wrap(fn: Callable) -> Callable:
        if key in REGISTRY:
            raise ValueError(f"method {key!r} is registered twice")
        spec = MethodSpec(key=key, name=name, family=family, paper_name=paper_name or name, rank=rank, fn=fn,
                          options=options_model(fn, name=f"{key}_options"), extras=(CONSTANT, *extras),
                          requires=requires, cost=declared(cost))
        if len(spec.extra_names) != len(spec.extras):
            raise ValueError(f"{key}: an extra is declared twice")
        REGISTRY[key] = spec
        return fn

    return wrap


def method_spec(key: str) -> MethodSpec:
    try:
        return REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown method {key!r}; valid: {', '.join(methods())}") from None


def methods(family: str | None = None) -> tuple[str, ...]:
    """Registered keys in the paper's order (rank), optionally of one family."""
    specs = sorted(REGISTRY.values(), key=lambda s: (s.rank, s.key))
    return tuple(s.key for s in specs if family is None or s.family == family)


__all__ = ["CONSTANT", "FAMILIES", "MethodSpec", "REGISTRY", "Requirement", "method_spec", "methods", "register"]
