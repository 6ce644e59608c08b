"""The run configuration: YAML in, a validated `RunConfig` out, before any cluster work starts.

The shape is declared once, as pydantic models; the options of each method and metric group are
validated against the typed schemas their functions declare (`opticam_core.options`). Every
error names its field path (`models[1].num_classes`, `methods.opticam.lr`) and what it allows,
and all errors of a config are reported together, so one edit fixes a config.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import annotated_types as at
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from opticam_core.methods import method_spec
from opticam_core.methods import methods as registered_methods
from opticam_core.metrics import GROUPS as METRIC_GROUPS
from opticam_core.models import available_models, recipe
from opticam_core.options import (
    Int,
    NonNegativeFloat,
    OptionsError,
    PositiveInt,
    problems,
)

from .storage import has_credentials, redact

#: `uri` of the embedded demo dataset: the photos packaged with opticam (pipeline.demo.samples).
DEMO_URI = "demo"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ConfigError(ValueError):
    """A run configuration that cannot run; the message lists every problem, one per line."""


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _path_safe(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("may hold only letters, digits, '_', '-', '.' and must not start with a symbol "
                         "(it names a directory)")
    return value


Text = Annotated[str, AfterValidator(_text)]
Name = Annotated[str, AfterValidator(_path_safe)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Spec):
    name: Name
    uri: Text
    limit: PositiveInt | None = None  # the first `limit` samples by sample_id (stable across nights)


class ModelSpec(_Spec):
    name: Text
    key: Name  # the id in results (`model` column, `model=` directory); default: the name
    weights: str | None = "default"
    checkpoint: Text | None = None
    num_classes: Annotated[Int, at.Ge(2)] | None = None
    layer: Text | None = None
    datasets: tuple[str, ...] | None = None  # None: every dataset
    methods: tuple[str, ...] | None = None   # None: every method of the run (the paper's tables differ
                                             # between CNNs and transformers)

    @model_validator(mode="before")
    @classmethod
    def _key_defaults_to_name(cls, data):
        if isinstance(data, Mapping) and data.get("key") is None and isinstance(data.get("name"), str):
            return {**data, "key": data["name"]}
        return data

    def load_kwargs(self) -> dict:
        return {"weights": self.weights, "checkpoint": self.checkpoint,
                "num_classes": self.num_classes, "layer": self.layer}


class ComputeSpec(_Spec):
    batch_size: PositiveInt = 32
    actors: PositiveInt = 1
    gpus_per_actor: NonNegativeFloat = 0
    cpus_per_actor: NonNegativeFloat = 1
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # custom Ray resources per actor


class RunConfig(_Spec):
    run_id: Name
    output: Text
    datasets: Annotated[list[DatasetSpec], at.MinLen(1)]
    models: Annotated[list[ModelSpec], at.MinLen(1)]
    #: method key → the options given (validated; defaults are not filled in, see `resolved_methods`)
    methods: dict[str, dict[str, Any]]
    #: metric group → the options given (validated)
    metrics: dict[str, dict[str, Any]] = Field(default_factory=lambda: {g: {} for g in METRIC_GROUPS})
    compute: ComputeSpec = ComputeSpec()
    save_maps: Literal["png", "none"] = "png"

    def pairs(self) -> list[tuple[DatasetSpec, ModelSpec]]:
        """The (dataset, model) plans of this run, in config order."""
        return [(d, m) for d in self.datasets for m in self.models if m.datasets is None or d.name in m.datasets]

    def methods_for(self, model: ModelSpec) -> dict[str, dict[str, Any]]:
        """The methods (and their given options) that run on `model`, in the config's order."""
        return {k: v for k, v in self.methods.items() if model.methods is None or k in model.methods}

    def plans(self) -> list[tuple[DatasetSpec, ModelSpec, list[str]]]:
        """(dataset, model, the methods run on it) for every plan."""
        return [(d, m, list(self.methods_for(m))) for d, m in self.pairs()]

    def resolved_methods(self) -> dict[str, dict[str, Any]]:
        """method → every option with its value (defaults filled in): what produces the rows."""
        return {k: method_spec(k).resolved(v) for k, v in self.methods.items()}

    def resolved_metrics(self) -> dict[str, dict[str, Any]]:
        return {g: METRIC_GROUPS[g].resolved(v) for g, v in self.metrics.items()}

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------------------
# Validation: the shape through pydantic, the options through each method's and group's schema


def _named_options(raw, where: str, registry: Mapping, what: str, validate) -> tuple[dict, list[str]]:
    """`{key: options}` (or a list of keys) checked key by key; (validated given options, problems)."""
    if isinstance(raw, list):
        if not all(isinstance(k, str) for k in raw):
            return {}, [f"{where}: a list must hold {what} names, got {raw!r}"]
        raw = {k: {} for k in raw}
    if not isinstance(raw, Mapping) or not raw:
        return {}, [f"{where}: must be a non-empty mapping {what} -> options; valid: {', '.join(registry)}"]
    out, errors = {}, []
    for key, opts in raw.items():
        if key not in registry:
            errors.append(f"{where}.{key}: unknown {what}; valid: {', '.join(registry)}")
            continue
        try:
            out[key] = validate(key, opts).model_dump(mode="json", exclude_unset=True)
        except OptionsError as err:
            errors += err.problems
    return out, errors


def _entries(raw, name: str) -> list[Mapping]:
    value = raw.get(name)
    return [x for x in value if isinstance(x, Mapping)] if isinstance(value, list) else []


def _cross_checks(raw: Mapping) -> list[str]:
    """What no single field can say: unique names and keys, models' datasets that exist. On the
    raw entries, so that an entry with another error is still checked."""
    errors = []
    datasets = [d.get("name") for d in _entries(raw, "datasets")]
    for i, name in enumerate(datasets):
        if name in datasets[:i]:
            errors.append(f"datasets[{i}].name: {name!r} is used twice")
    models = _entries(raw, "models")
    keys = [m.get("key") or m.get("name") for m in models]
    for i, m in enumerate(models):
        if keys[i] in keys[:i]:
            errors.append(f"models[{i}].key: {keys[i]!r} is used twice; give one of them another key")
        if isinstance(m.get("name"), str) and not m.get("layer") and recipe(m["name"]).layer is None:
            errors.append(f"models[{i}].layer: {m['name']!r} is not a built-in model ({', '.join(available_models())}): "
                          "name its target layer")
        listed = m.get("methods")
        if isinstance(listed, list) and isinstance(raw.get("methods"), (Mapping, list)):
            errors += [f"models[{i}].methods: {name!r} is not a method of this run; methods: {list(raw['methods'])}"
                       for name in listed if name not in raw["methods"]]
        wanted = m.get("datasets")
        if datasets and isinstance(wanted, list):
            errors += [f"models[{i}].datasets: {name!r} is not a dataset of this run; datasets: {datasets}"
                       for name in wanted if name not in datasets]
    errors += _unservable_pairs(raw, models)
    if datasets and models and not any(not isinstance(m.get("datasets"), list) or set(m["datasets"]) & set(datasets)
                                       for m in models):
        errors.append("models: no model applies to any dataset")
    return errors


def _unservable_pairs(raw: Mapping, models: list[Mapping]) -> list[str]:
    """A method paired with a model it cannot serve (e.g. attention methods on a CNN) would only
    give rows of errors on the cluster: refuse the pair here, where the recipe can tell."""
    methods = raw.get("methods") if isinstance(raw.get("methods"), Mapping) else {}
    errors = []
    for key in methods:
        needs = method_spec(key).requires if key in registered_methods() else None
        if needs is None:
            continue
        for i, m in enumerate(models):
            listed = m.get("methods")
            if not isinstance(m.get("name"), str) or (isinstance(listed, list) and key not in listed):
                continue
            r = recipe(m["name"], layer=m.get("layer"))
            if needs.serves_recipe(r) is False:
                errors.append(f"methods.{key}: needs {needs.name}, which models[{i}] ({m['name']!r}) does not have; "
                              f"it accepts {needs.accepts} (list the methods this model runs in models[{i}].methods)")
    return errors


def _uris_with_credentials(raw: dict) -> list[str]:
    """URIs that carry credentials would copy them into manifests, rows and logs: refuse them,
    and blank them so that no later message quotes them either."""
    errors = []
    places = [("output", raw, "output")]
    places += [(f"datasets[{i}].uri", d, "uri") for i, d in enumerate(_entries(raw, "datasets"))]
    places += [(f"models[{i}].checkpoint", m, "checkpoint") for i, m in enumerate(_entries(raw, "models"))]
    for where, holder, key in places:
        value = holder.get(key)
        if isinstance(value, str) and has_credentials(value):
            errors.append(f"{where}: credentials in a URI are not used and would be copied into logs and "
                          f"results ({redact(value)}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE) instead")
            holder[key] = redact(value)
    return errors


def parse_config(raw: Mapping[str, Any], *, run_id: str | None = None, output: str | None = None) -> RunConfig:
    """Validate a config mapping; command-line `run_id` / `output` override the file's."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"invalid run config:\n  config: must be a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    raw["run_id"] = run_id or raw.get("run_id") or default_run_id()
    if output:
        raw["output"] = output
    credential_errors = _uris_with_credentials(raw)
    methods, errors = _named_options(raw.get("methods"), "methods", registered_methods(), "method",
                                     lambda k, o: method_spec(k).validate(o, f"methods.{k}"))
    metric_errors: list[str] = []
    if raw.get("metrics") is not None:
        raw["metrics"], metric_errors = _named_options(raw["metrics"], "metrics", METRIC_GROUPS, "metric group",
                                                       lambda k, o: METRIC_GROUPS[k].validate(o))
    errors += metric_errors
    raw["methods"] = methods
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        config = None
        errors = problems(err, "", RunConfig) + errors
    errors += _cross_checks(raw) + credential_errors
    if errors or config is None:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(errors))
    return config


def _is_file(source) -> bool:
    try:
        return Path(str(source)).is_file()
    except OSError:  # YAML text too long to be a file name
        return False


def load_config(source, *, run_id: str | None = None, output: str | None = None) -> RunConfig:
    """A run config from a YAML file path, YAML text, or a mapping."""
    if isinstance(source, Mapping):
        raw = source
    else:
        text = Path(source).read_text() if _is_file(source) else None
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
