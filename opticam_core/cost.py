"""What a configuration costs: model evaluations per image, declared by each method and metric group.

Convention: costs count passes of the whole network per image; a backward counts as two
forwards (its matrix products are about twice a forward's), so `equivalents = forwards +
2·backwards`. A partial pass (TIBAV's backward down to a block) counts as a whole one, except
Ablation-CAM's tail, counted as its fraction of a forward's FLOPs where the model is known: the
numbers are an upper bound where a method cuts corners (early stopping, skipped channels).

Each registration declares its cost (`register(..., cost=...)`, `register_group(..., cost=...)`)
as a callable of its validated options and, where the count depends on the network, of a
`ModelInfo` (channels of the explained layer, blocks, input size) known without loading weights.
A cost says which of `explain`'s shared clean passes it reads (`shared`: "forward" — the clean
forward with the layer's features — or "gradients" — forward and backward): methods asked
together pay them once. A group that runs the method again says how often per image (`reruns`);
each rerun is a fresh `explain` call, shared passes included.

`per_image(methods, metrics, info)` adds them up for one plan (dataset × model): one row per
method, per group, and per shared pass, each counted once.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Mapping

#: The shared passes of `explain` (methods/base.py Context), by what they cost.
SHARED_PASSES = {"forward": (1.0, 0.0), "gradients": (1.0, 1.0)}


@dataclass(frozen=True)
class Cost:
    """Model evaluations per image. forwards/backwards: whole-network passes. shared: the shared
    clean passes of `explain` read (counted once per call, not here). reruns: times a metric group
    runs the method again per image. note: what is estimated or left out."""

    forwards: float = 0.0
    backwards: float = 0.0
    shared: frozenset[str] = frozenset()
    reruns: float = 0.0
    note: str = ""
    once: float = 0.0  # forwards a metric group pays once for all the methods of a batch (not in `forwards`)

    def __post_init__(self):
        object.__setattr__(self, "shared", frozenset(self.shared))
        unknown = self.shared - set(SHARED_PASSES)
        if unknown:
            raise ValueError(f"unknown shared passes {sorted(unknown)}; valid: {', '.join(SHARED_PASSES)}")

    @property
    def equivalents(self) -> float:
        """Forward-equivalents: forwards + 2·backwards (reruns and shared passes not included)."""
        return self.forwards + 2 * self.backwards

    def standalone(self) -> "Cost":
        """The cost of one `explain` call of this method alone: its shared passes paid in."""
        # The gradient pass also serves the features and logits: one pass, the richest asked.
        richest = "gradients" if "gradients" in self.shared else "forward" if "forward" in self.shared else None
        f, b = SHARED_PASSES[richest] if richest else (0.0, 0.0)
        return replace(self, forwards=self.forwards + f, backwards=self.backwards + b, shared=frozenset())

    def __add__(self, other: "Cost") -> "Cost":
        if not isinstance(other, Cost):
            return NotImplemented
        note = "; ".join(n for n in (self.note, other.note) if n)
        return Cost(self.forwards + other.forwards, self.backwards + other.backwards, self.shared | other.shared,
                    self.reruns + other.reruns, note, self.once + other.once)

    def __mul__(self, k: float) -> "Cost":
        if not isinstance(k, (int, float)):
            return NotImplemented
        return replace(self, forwards=self.forwards * k, backwards=self.backwards * k, reruns=self.reruns * k,
                       once=self.once * k)

    __rmul__ = __mul__


FREE = Cost()


@dataclass(frozen=True)
class ModelInfo:
    """What a cost may depend on, known at `--check` without weights. None: unknown (the cost
    then estimates and says so in its note)."""

    name: str = ""
    channels: int | None = None                  # K, channels of the explained layer
    blocks: int | None = None                    # attention blocks (ViT/DeiT), or None
    input_size: tuple[int, int] | None = None    # H, W of the network's input
    tail: float | None = None                    # Ablation-CAM's tail, as a fraction of a forward; None: no tail
    gflops: float | None = None                  # one forward of one image, GFLOP (2 per multiply-add)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def pixels(self) -> int | None:
        return None if self.input_size is None else self.input_size[0] * self.input_size[1]


#: The K assumed where a layer's channels are unknown (ResNet-50's layer4; the estimate says so).
DEFAULT_CHANNELS = 2048
DEFAULT_PIXELS = 224 * 224


def channels(info: ModelInfo | None) -> tuple[int, str]:
    """(K, note): the layer's channels, or DEFAULT_CHANNELS with a note saying it is assumed."""
    if info is not None and info.channels is not None:
        return int(info.channels), ""
    return DEFAULT_CHANNELS, f"K unknown, {DEFAULT_CHANNELS} assumed"


def pixels(info: ModelInfo | None) -> tuple[int, str]:
    if info is not None and info.pixels is not None:
        return int(info.pixels), ""
    return DEFAULT_PIXELS, "input size unknown, 224×224 assumed"


def declared(cost: Cost | Callable | None) -> Callable[[Any, ModelInfo | None], Cost] | None:
    """A registration's `cost=` as a callable (options, info) → Cost: a Cost (fixed), a callable
    of the options alone, or of (options, info)."""
    if cost is None:
        return None
    if isinstance(cost, Cost):
        return lambda options, info: cost
    if not callable(cost):
        raise TypeError(f"cost must be a Cost or a callable returning one, got {type(cost).__name__}")
    params = [p for p in inspect.signature(cost).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= 2:
        return cost
    return lambda options, info: cost(options)


@lru_cache(maxsize=64)
def model_info(name: str, layer: str | None = None, num_classes: int | None = None) -> ModelInfo:
    """What the costs need of model `name` (a built-in, or a torchvision/timm name with its
    `layer`), read off its architecture built on the meta device: no weights, no memory, well
    under a second. Unknown fields stay None with a note (e.g. a network meta cannot build)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .hooks import capture
    from .models.tails import find_tail
    from .models.zoo import meta_network, recipe

    r = recipe(name, weights=None, num_classes=num_classes, layer=layer)
    base = ModelInfo(name=r.name, input_size=tuple(r.input_size))
    try:
        net = meta_network(r.name)
        if net is None:
            return replace(base, notes=(f"{name}: not a torchvision or timm model",))
        with torch.device("meta"):
            if num_classes is not None:
                from .models.networks import replace_head

                replace_head(net, num_classes)
            net.eval()
            x = torch.empty(1, 3, *r.input_size)
            target = net.get_submodule(r.layer) if r.layer else None
            with torch.no_grad():
                counter = FlopCounterMode(display=False)
                if target is None:
                    with counter:
                        net(x)
                    out = None
                else:
                    with counter, capture(target) as cap:
                        net(x)
                    out = cap.output
                flops = counter.get_total_flops()
                tail = _tail_fraction(net, r.layer, x, out, flops, find_tail) if out is not None else None
    except Exception as err:  # an architecture meta cannot build or run: the costs estimate
        return replace(base, notes=(f"{name}: architecture not readable on meta ({type(err).__name__})",))
    if out is None:
        k = None
    else:
        k = int(out.shape[-1]) if out.dim() == 3 else int(out.shape[1])  # tokens B×N×C, maps B×K×h×w
    blocks = getattr(net, "blocks", None)
    n_blocks = len(blocks) if isinstance(blocks, torch.nn.Sequential) and out is not None and out.dim() == 3 else None
    return replace(base, channels=k, blocks=n_blocks, tail=tail, gflops=flops / 1e9 if flops else None)


def _tail_fraction(net, layer: str, x, out, flops: int, find_tail) -> float | None:
    """Ablation-CAM's tail (`models.tails.find_tail`) as a fraction of a forward, where the
    bundle would keep it: not for token layers; for timm's forward_head only when the layer's
    output is what forward_features returns (the bundle checks exactness on a probe image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .hooks import capture

    if out.dim() == 3:
        return None
    tail = find_tail(net, layer)
    if tail is None:
        return None
    if hasattr(net, "forward_features") and hasattr(net, "forward_head"):
        with capture(net.get_submodule(layer)) as cap:
            feats = net.forward_features(x)
        if cap.output is not feats:
            return None
    counter = FlopCounterMode(display=False)
    with counter:
        tail(out)
    return counter.get_total_flops() / flops if flops else None


@dataclass(frozen=True)
class Line:
    """One row of the table: `what` it counts (`method opticam`, `metrics insertion_deletion
    (opticam)`, a shared pass), for which `method` and metric `group` (None for shared passes)."""

    what: str
    forwards: float
    backwards: float
    note: str = ""
    method: str | None = None
    group: str | None = None

    @property
    def equivalents(self) -> float:
        return self.forwards + 2 * self.backwards


@dataclass(frozen=True)
class Table:
    """The model evaluations per image of one plan, row by row (iterate it, or `format` it)."""

    lines: tuple[Line, ...]

    @property
    def forwards(self) -> float:
        return sum(line.forwards for line in self.lines)

    @property
    def backwards(self) -> float:
        return sum(line.backwards for line in self.lines)

    @property
    def equivalents(self) -> float:
        return sum(line.equivalents for line in self.lines)

    def __iter__(self):
        return iter(self.lines)

    def format(self, images: int | None = None, indent: str = "  ", gflops: float | None = None,
               targets: int = 1) -> str:
        """Forward-equivalents per image as a grid: a row per method (its own passes, then each
        metric group on its maps, reruns included), the shared passes, and the total (× images
        and × `targets`, the classes each image is explained for, and in TFLOP with `gflops` per
        forward, when given)."""
        methods = list(dict.fromkeys(line.method for line in self.lines if line.method))
        groups = list(dict.fromkeys(line.group for line in self.lines if line.group))
        cols = ["method", *groups, "total"]
        grid = []
        for m in methods:
            mine = [line for line in self.lines if line.method == m]
            cells = {line.group or "method": line.equivalents for line in mine}
            grid.append((m, [_num(cells[c]) if c in cells else "" for c in cols[:-1]]
                         + [_num(sum(line.equivalents for line in mine))]))
        shared = [line for line in self.lines if line.method is None]
        for line in shared:
            grid.append((line.what, [""] * (len(cols) - 1) + [_num(line.equivalents)]))
        per_image = self.equivalents * targets
        total = f"{_num(self.equivalents)} per image" + (f" × {targets} targets" if targets > 1 else "")
        if images is not None:
            total += f" × {images:,} images = {_num(per_image * images)}"
        if gflops:
            per = per_image * gflops / 1e3
            total += f"; {per:,.1f} TFLOP per image" + (f", {per * images / 1e3:,.1f} PFLOP" if images else "")
        head = ("forward-equivalents", *cols)
        widths = [max(len(head[0]), *(len(r[0]) for r in grid))]
        widths += [max(len(c), *(len(r[1][i]) for r in grid)) for i, c in enumerate(cols)]
        fmt = lambda cells: indent + "  ".join(  # noqa: E731
            [f"{cells[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]).rstrip()
        out = [fmt(head), *(fmt((name, *cells)) for name, cells in grid), f"{indent}total: {total}"]
        out.append(f"{indent}(a backward counts as 2 forwards; a partial pass as a whole one unless noted)")
        # A group's note is the same for every method unless it reruns the method: say it once.
        notes = list(dict.fromkeys((line.group if line.group else (line.method or line.what)) + f": {line.note}"
                                   for line in self.lines if line.note))
        out += [f"{indent}({n})" for n in notes]
        return "\n".join(out)


def _num(x: float) -> str:
    if math.isnan(x):
        return "?"
    if x == int(x) or abs(x) >= 100:
        return f"{round(x):,}"
    return f"{x:,.1f}"


def per_image(methods: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
              model_info: ModelInfo | None = None) -> Table:
    """The model evaluations per image of one plan: `methods` key → options (dict or validated;
    `base:variant` keys as in a run config) as one `explain` call runs them, `metrics` group →
    options as `compute` runs them on each method's maps. Rows: explain's shared clean pass
    (once: forward+backward if a gradient method is asked), each method, the metrics' clean
    forward (once: the job runs it once per batch for every method), and each group on each
    method's maps, its reruns of the method included (each a standalone `explain`). A method or
    group that declares no cost counts as NaN ("?"). OptionsError for bad options."""
    from .methods.registry import method_spec
    from .metrics.registry import GROUPS

    metrics = dict(metrics or {})
    own = {key: _declared_or_unknown(method_spec(_base(key)), opts, model_info) for key, opts in methods.items()}
    lines: list[Line] = []
    once: list[Line] = []
    for key, c in own.items():
        lines.append(Line(f"method {key}", c.forwards, c.backwards, c.note, method=key))
    for group, opts in metrics.items():
        if group not in GROUPS:
            raise ValueError(f"unknown metric group {group!r}; valid: {', '.join(GROUPS)}")
        g = _declared_or_unknown(GROUPS[group], opts, model_info)
        for key, c in own.items():
            total = g + c.standalone() * g.reruns if g.reruns else g
            note = "; ".join(n for n in (f"reruns the method ×{_num(g.reruns)}" if g.reruns else "", g.note) if n)
            lines.append(Line(f"metrics {group} ({key})", total.forwards, total.backwards, note,
                              method=key, group=group))
        if g.once and own:
            once.append(Line(f"{group}'s method-free forwards (shared)", g.once, 0))
    shared = frozenset().union(*(c.shared for c in own.values())) if own else frozenset()
    if "gradients" in shared:
        lines.append(Line("explain's clean forward+backward (shared)", *SHARED_PASSES["gradients"]))
    elif "forward" in shared:
        lines.append(Line("explain's clean forward (shared)", *SHARED_PASSES["forward"]))
    if metrics and own:
        lines.append(Line("metrics' clean forward (shared)", 1, 0))
    return Table(tuple(lines + once))


#: What a registration without a declared cost counts as: unknown, and the table says so.
UNKNOWN = Cost(forwards=math.nan, note="declares no cost")


def _declared_or_unknown(spec, options, info) -> Cost:
    if spec.cost is None:
        return UNKNOWN
    return spec.cost_of(options, info)


def _base(key: str) -> str:
    """A run config's `base:variant` method key → the registered method."""
    from .methods.registry import REGISTRY

    return key if key in REGISTRY else key.split(":", 1)[0]


__all__ = ["Cost", "DEFAULT_CHANNELS", "FREE", "Line", "ModelInfo", "SHARED_PASSES", "Table", "channels", "declared",
           "model_info", "per_image", "pixels"]
