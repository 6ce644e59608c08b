"""The run configuration: YAML in, a validated `RunConfig` out, before any cluster work starts.

Every error names the field (`models[1].num_classes`) and what it allows, and all errors of a
config are reported together, so one edit fixes a config.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from opticam_core.methods import METHODS, method_options
from opticam_core.metrics import GROUPS as METRIC_GROUPS
from opticam_core.metrics import compute as compute_metrics

#: `uri` of the embedded demo dataset: the photos packaged with opticam (pipeline.demo.samples).
DEMO_URI = "demo"
SAVE_MAPS = ("png", "none")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # safe as a path component (dataset=…, model=…)
TOP_LEVEL = ("run_id", "output", "datasets", "models", "methods", "metrics", "compute", "save_maps")


class ConfigError(ValueError):
    """A run configuration that cannot run; the message lists every problem, one per line."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    uri: str
    limit: int | None = None  # the first `limit` samples by sample_id (stable across nights)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    key: str  # the id in results (`model` column, `model=` directory)
    weights: str | None = "default"
    checkpoint: str | None = None
    num_classes: int | None = None
    layer: str | None = None
    datasets: tuple[str, ...] | None = None  # None: every dataset

    def load_kwargs(self) -> dict:
        return {"weights": self.weights, "checkpoint": self.checkpoint,
                "num_classes": self.num_classes, "layer": self.layer}


@dataclass(frozen=True)
class ComputeSpec:
    batch_size: int = 32
    actors: int = 1
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor (node types)


@dataclass
class RunConfig:
    run_id: str
    output: str
    datasets: list[DatasetSpec]
    models: list[ModelSpec]
    methods: dict[str, dict]
    metrics: dict[str, dict]
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    save_maps: str = "png"

    def pairs(self) -> list[tuple[DatasetSpec, ModelSpec]]:
        """The (dataset, model) plans of this run, in config order."""
        return [(d, m) for d in self.datasets for m in self.models if m.datasets is None or d.name in m.datasets]

    def to_dict(self) -> dict:
        out = asdict(self)
        for m in out["models"]:
            m["datasets"] = list(m["datasets"]) if m["datasets"] is not None else None
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def method_options_json(self, method: str) -> str:
        """The options a method's rows are stamped with (resume checks them)."""
        return json.dumps(self.methods[method], sort_keys=True, default=list)


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _metric_options() -> dict[str, object]:
    sig = inspect.signature(compute_metrics)
    return {n: p.default for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY
            and n not in ("which", "clean_logits", "method_free")}


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def mapping(self, where: str, value, allowed: tuple[str, ...] | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.err(where, f"must be a mapping, got {type(value).__name__}")
            return {}
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    self.err(f"{where}.{key}", f"unknown field; allowed: {', '.join(allowed)}")
        return dict(value)

    def string(self, where: str, value, *, required=False, pattern: re.Pattern | None = None) -> str | None:
        if value is None:
            if required:
                self.err(where, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.err(where, f"must be a non-empty string, got {value!r}")
            return None
        if pattern is not None and not pattern.match(value):
            self.err(where, f"{value!r} may hold only letters, digits, '_', '-', '.' (it names a directory)")
        return value

    def integer(self, where: str, value, *, minimum: int, allow_none=True) -> int | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.err(where, f"must be an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}")
            return None
        return value

    def number(self, where: str, value, *, minimum: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            self.err(where, f"must be a number >= {minimum}, got {value!r}")
            return None
        return value


def _datasets(c: _Checker, raw) -> list[DatasetSpec]:
    if not isinstance(raw, list) or not raw:
        c.err("datasets", "must be a non-empty list of {name, uri, limit}")
        return []
    out, seen = [], set()
    for i, d in enumerate(raw):
        where = f"datasets[{i}]"
        d = c.mapping(where, d, ("name", "uri", "limit"))
        name = c.string(f"{where}.name", d.get("name"), required=True, pattern=_NAME)
        uri = c.string(f"{where}.uri", d.get("uri"), required=True)
        limit = c.integer(f"{where}.limit", d.get("limit"), minimum=1)
        if name in seen:
            c.err(f"{where}.name", f"{name!r} is used twice")
        seen.add(name)
        if name and uri:
            out.append(DatasetSpec(name, uri, limit))
    return out


def _models(c: _Checker, raw, dataset_names: set[str]) -> list[ModelSpec]:
    if not isinstance(raw, list) or not raw:
        c.err("models", "must be a non-empty list of {name, key, weights, checkpoint, num_classes, layer, datasets}")
        return []
    allowed = ("name", "key", "weights", "checkpoint", "num_classes", "layer", "datasets")
    out, seen = [], set()
    for i, m in enumerate(raw):
        where = f"models[{i}]"
        m = c.mapping(where, m, allowed)
        name = c.string(f"{where}.name", m.get("name"), required=True)
        key = c.string(f"{where}.key", m.get("key", name), pattern=_NAME)
        weights = m.get("weights", "default")
        if weights is not None and not isinstance(weights, str):
            c.err(f"{where}.weights", f"must be a weights name, 'default' or null, got {weights!r}")
        checkpoint = c.string(f"{where}.checkpoint", m.get("checkpoint"))
        num_classes = c.integer(f"{where}.num_classes", m.get("num_classes"), minimum=2)
        layer = c.string(f"{where}.layer", m.get("layer"))
        ds = m.get("datasets")
        if ds is not None:
            if not isinstance(ds, list) or not all(isinstance(x, str) for x in ds):
                c.err(f"{where}.datasets", f"must be a list of dataset names, got {ds!r}")
                ds = None
            else:
                for x in ds:
                    if x not in dataset_names:
                        c.err(f"{where}.datasets", f"{x!r} is not a dataset of this run; datasets: {sorted(dataset_names)}")
                ds = tuple(ds)
        if key in seen:
            c.err(f"{where}.key", f"{key!r} is used twice; give one of them another key")
        seen.add(key)
        if name and key:
            out.append(ModelSpec(name, key, weights, checkpoint, num_classes, layer, ds))
    return out


def _methods(c: _Checker, raw) -> dict[str, dict]:
    if isinstance(raw, list):
        raw = {k: {} for k in raw}
    if not isinstance(raw, Mapping) or not raw:
        c.err("methods", f"must be a non-empty mapping method -> options; methods: {', '.join(METHODS)}")
        return {}
    out = {}
    for key, opts in raw.items():
        where = f"methods.{key}"
        if key not in METHODS:
            c.err(where, f"unknown method; valid: {', '.join(METHODS)}")
            continue
        opts = c.mapping(where, opts, tuple(method_options(key)))
        out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
    return out


def _metrics(c: _Checker, raw) -> dict[str, dict]:
    if raw is None:
        raw = list(METRIC_GROUPS)
    if isinstance(raw, list):
        raw = {k: {} for k in raw}
    if not isinstance(raw, Mapping):
        c.err("metrics", f"must be a list or mapping of groups; groups: {', '.join(METRIC_GROUPS)}")
        return {}
    allowed = tuple(_metric_options())
    out = {}
    for group, opts in raw.items():
        if group not in METRIC_GROUPS:
            c.err(f"metrics.{group}", f"unknown metric group; valid: {', '.join(METRIC_GROUPS)}")
            continue
        out[group] = c.mapping(f"metrics.{group}", opts, allowed)
    return out


def _compute(c: _Checker, raw) -> ComputeSpec:
    d = c.mapping("compute", raw, tuple(ComputeSpec.__dataclass_fields__))
    spec = ComputeSpec()
    values = {
        "batch_size": c.integer("compute.batch_size", d.get("batch_size", spec.batch_size), minimum=1, allow_none=False),
        "actors": c.integer("compute.actors", d.get("actors", spec.actors), minimum=1, allow_none=False),
        "gpus_per_actor": c.number("compute.gpus_per_actor", d.get("gpus_per_actor", spec.gpus_per_actor), minimum=0),
        "cpus_per_actor": c.number("compute.cpus_per_actor", d.get("cpus_per_actor", spec.cpus_per_actor), minimum=0),
    }
    resources = c.mapping("compute.resources", d.get("resources"))
    for name, amount in resources.items():
        c.number(f"compute.resources.{name}", amount, minimum=0)
    return ComputeSpec(**{k: v for k, v in values.items() if v is not None}, resources=resources)


def parse_config(raw: Mapping[str, Any], *, run_id: str | None = None, output: str | None = None) -> RunConfig:
    """Validate a config mapping; command-line `run_id` / `output` override the file's."""
    c = _Checker()
    raw = c.mapping("config", raw, TOP_LEVEL)
    run_id = run_id or raw.get("run_id") or default_run_id()
    c.string("run_id", run_id, pattern=_NAME)
    out_uri = output or raw.get("output")
    c.string("output", out_uri, required=True)
    datasets = _datasets(c, raw.get("datasets"))
    models = _models(c, raw.get("models"), {d.name for d in datasets})
    methods = _methods(c, raw.get("methods"))
    metrics = _metrics(c, raw.get("metrics"))
    compute = _compute(c, raw.get("compute"))
    save_maps = raw.get("save_maps", "png")
    if save_maps not in SAVE_MAPS:
        c.err("save_maps", f"must be one of {', '.join(SAVE_MAPS)}, got {save_maps!r}")
    if datasets and models and not any(m.datasets is None or set(m.datasets) & {d.name for d in datasets} for m in models):
        c.err("models", "no model applies to any dataset")
    if c.errors:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(c.errors))
    return RunConfig(str(run_id), str(out_uri), datasets, models, methods, metrics, compute, save_maps)


def load_config(source, *, run_id: str | None = None, output: str | None = None) -> RunConfig:
    """A run config from a YAML file path, YAML text, or a mapping."""
    if isinstance(source, Mapping):
        raw = source
    else:
        text = Path(source).read_text() if Path(str(source)).is_file() else None
        if text is None:
            if "\n" not in str(source) and str(source).endswith((".yaml", ".yml")):
                raise ConfigError(f"config file not found: {source}")
            text = str(source)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config is not valid YAML: {err}") from err
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config must be a YAML mapping, got {type(raw).__name__}")
    return parse_config(raw, run_id=run_id, output=output)
