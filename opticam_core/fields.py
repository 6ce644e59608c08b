"""The per-image values that methods and metrics emit, declared where they are made.

A method declares its extras (`methods.registry.register(..., extras=...)`), a metric group its
fields (`metrics.registry.register_group(..., fields=...)`); `per_image_fields()` is their union,
the contract between the core, the result rows the job writes (one column per stored field, with
the Arrow type named here), and `metrics.aggregate`, which reads them back.

A value that does not apply to an image (no boxes; not Opti-CAM) is null / NaN in the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Arrow types of stored per-image values (the job maps them to pyarrow types) and the torch
#: dtypes a value of that kind may have before it is written.
KINDS = {
    "float64": "a number per image",
    "int64": "an integer per image",
    "bool": "true/false per image",
    "list<float32>": "a vector per image (B×T)",
    "tensor": "kept in memory only, not written to rows (e.g. full-resolution masks)",
}


@dataclass(frozen=True)
class PerImage:
    """One per-image value: its name (the result column), Arrow type and meaning."""

    name: str
    kind: str
    doc: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")

    @property
    def stored(self) -> bool:
        return self.kind != "tensor"


def merge(groups: dict[str, tuple[PerImage, ...]]) -> dict[str, PerImage]:
    """One table of fields from several declarers; a name declared twice must mean the same kind."""
    out: dict[str, PerImage] = {}
    owner: dict[str, str] = {}
    for who, fields in groups.items():
        for f in fields:
            if f.name in out and out[f.name].kind != f.kind:
                raise TypeError(f"per-image field {f.name!r} is {out[f.name].kind} in {owner[f.name]} "
                                f"but {f.kind} in {who}")
            out.setdefault(f.name, f)
            owner.setdefault(f.name, who)
    return out


def per_image_fields() -> dict[str, PerImage]:
    """Every stored per-image field: the metrics' base fields, preprocessing's, each metric
    group's, then every registered method's extras, in registration order."""
    from . import methods, metrics  # noqa: F401  (the registrations)
    from .methods.registry import REGISTRY
    from .metrics.registry import BASE_FIELDS, GROUPS
    from .transforms import FIELDS as PREPROCESSING

    declared = {"metrics": BASE_FIELDS, "preprocessing": PREPROCESSING}
    declared.update({f"metric group {g.key}": g.fields for g in GROUPS.values()})
    declared.update({f"method {m.key}": m.extras for m in REGISTRY.values()})
    return {k: f for k, f in merge(declared).items() if f.stored}


__all__ = ["KINDS", "PerImage", "merge", "per_image_fields"]
