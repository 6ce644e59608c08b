"""The run configuration: YAML in, a validated `RunConfig` out, before any cluster work starts.

The shape is declared once, as pydantic models; the options of each method and metric group are
validated against the typed schemas their functions declare (`opticam_core.options`). Every
error names its field path (`models[1].num_classes`, `methods.opticam.lr`) and what it allows,
and all errors of a config are reported together, so one edit fixes a config.
"""

from __future__ import annotations

import copy
import functools
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
    StrictBool,
    ValidationError,
    model_validator,
)

from opticam_core.methods import method_spec
from opticam_core.methods import methods as registered_methods
from opticam_core.metrics import GROUPS as METRIC_GROUPS
from opticam_core.metrics import default_groups
from opticam_core.models import available_models, meta_network, recipe
from opticam_core.options import (
    Int,
    NonNegativeFloat,
    OptionsError,
    PositiveInt,
    problems,
)
from opticam_core.precision import PRECISIONS

from .preprocess import PreprocessSpec
from .storage import has_credentials, redact

#: `uri` of the embedded demo dataset: the photos packaged with opticam (pipeline.demo.samples).
DEMO_URI = "demo"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

#: The classes a map can be made for (paper Table A.9): the ground truth, or the most, second-most
#: or least probable class on the clean image. The metrics always use the ground truth.
TARGETS = ("label", "top1", "top2", "least")
Target = Literal["label", "top1", "top2", "least"]

#: `methods:` keys are a registered method, or `base:variant` (the base with other options, e.g.
#: `opticam:diff`), so that one run holds several settings of one method (paper Tables 6, A.12).
VARIANT_SEP = ":"


def method_base(key: str) -> str:
    """The registered method a `methods:` key runs (`opticam:diff` → `opticam`)."""
    return key.split(VARIANT_SEP, 1)[0]


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


class SubsetSpec(_Spec):
    """A class-balanced subset chosen by `seed` (the paper's 1,000 ImageNet-val images):
    the same samples in every run, whatever the files' layout (`pipeline.job.balanced_subset`)."""

    size: PositiveInt
    seed: Int = 0


class DatasetSpec(_Spec):
    name: Name
    uri: Text
    subset: SubsetSpec | None = None  # applied first, then `limit`
    limit: PositiveInt | None = None  # the first `limit` samples by sample_id (stable across nights)
    #: how images become the model's input (issue 13): None, the model's own (Resize(256)/CenterCrop(224));
    #: `{resize: 224}` the fine-tuned medical models' direct resize (`pipeline.preprocess`)
    preprocess: PreprocessSpec | None = None


class ModelSpec(_Spec):
    name: Text
    key: Name  # the id in results (`model` column, `model=` directory); default: the name
    weights: str | None = "default"
    checkpoint: Text | None = None
    num_classes: Annotated[Int, at.Ge(2)] | None = None
    layer: Text | None = None
    #: several target layers of one network (paper Table A.13): one plan per layer, keys `{key}@{layer}`
    layers: Annotated[tuple[Text, ...], at.MinLen(1)] | None = None
    normalize: bool = True  # False: [0,1] pixels without mean/std (paper Table A.14)
    datasets: tuple[str, ...] | None = None  # None: every dataset
    methods: tuple[str, ...] | None = None   # None: every method of the run (the paper's tables differ
                                             # between CNNs and transformers)

    @model_validator(mode="before")
    @classmethod
    def _key_defaults_to_name(cls, data):
        if isinstance(data, Mapping) and data.get("key") is None and isinstance(data.get("name"), str):
            return {**data, "key": default_model_key(data)}
        return data

    @model_validator(mode="after")
    def _one_way_to_name_layers(self):
        if self.layer is not None and self.layers is not None:
            raise ValueError("give `layer` or `layers`, not both")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"`layers` names a layer twice: {list(self.layers)}")
        return self

    def expand(self) -> list["ModelSpec"]:
        """One entry per target layer: itself, or with `layers` one `{key}@{layer}` per layer."""
        if self.layers is None:
            return [self]
        # model_copy does not validate: '@' stays out of the keys a user may write
        return [self.model_copy(update={"key": f"{self.key}@{layer}", "layer": layer, "layers": None})
                for layer in self.layers]

    def load_kwargs(self) -> dict:
        return {"weights": self.weights, "checkpoint": self.checkpoint,
                "num_classes": self.num_classes, "layer": self.layer, "normalize": self.normalize}


def default_model_key(entry: Mapping) -> str:
    """A model entry's key when it gives none: its name (`{name}-unnormalized` without normalisation,
    so that the study's rows never mix with the normalised model's)."""
    name = entry.get("name")
    return f"{name}-unnormalized" if entry.get("normalize") is False else name


class ComputeSpec(_Spec):
    batch_size: PositiveInt = 32
    actors: PositiveInt = 1
    gpus_per_actor: NonNegativeFloat = 0
    cpus_per_actor: NonNegativeFloat = 1
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # custom Ray resources per actor
    #: The decode stage before the actors (`pipeline.decode`): CPUs per decode task (one batch
    #: each), and at most how many tasks run at once (None: as many as the free CPUs and Ray
    #: Data's backpressure allow).
    decode_cpus: NonNegativeFloat = 1
    decode_tasks: PositiveInt | None = None
    #: How the network runs (`opticam_core.precision`): fp32 (the default, the measured choice:
    #: README "Precision"), tf32 (CUDA only; fp32 on a CPU), bf16 (the network under bfloat16
    #: autocast, maps and optimiser state in fp32). Recorded in the run's fingerprint.
    precision: Literal[PRECISIONS] = "fp32"
    #: The network's forward through torch.compile (same results up to float rounding; not in the
    #: fingerprint). Off by default: on the CPU it did not pay (README "Compiled passes").
    compile: StrictBool = False


class RunConfig(_Spec):
    run_id: Name
    output: Text
    datasets: Annotated[list[DatasetSpec], at.MinLen(1)]
    models: Annotated[list[ModelSpec], at.MinLen(1)]
    #: method key → the options given (validated; defaults are not filled in, see `resolved_methods`)
    methods: dict[str, dict[str, Any]]
    #: metric group → the options given (validated)
    metrics: dict[str, dict[str, Any]] = Field(default_factory=lambda: {g: {} for g in default_groups()})
    compute: ComputeSpec = ComputeSpec()
    save_maps: Literal["png", "none"] = "png"
    #: the classes maps are made for (rows' `target`); the metrics always use the label
    targets: Annotated[tuple[Target, ...], at.MinLen(1)] = ("label",)

    @model_validator(mode="after")
    def _targets_once(self):
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"`targets` names a target twice: {list(self.targets)}")
        return self

    def model_entries(self) -> list[ModelSpec]:
        """The models as the job runs them: entries with `layers` expanded, one per layer."""
        return [e for m in self.models for e in m.expand()]

    def pairs(self) -> list[tuple[DatasetSpec, ModelSpec]]:
        """The (dataset, model) plans of this run, in config order (`layers` expanded)."""
        return [(d, m) for d in self.datasets for m in self.model_entries()
                if m.datasets is None or d.name in m.datasets]

    def methods_for(self, model: ModelSpec) -> dict[str, dict[str, Any]]:
        """The methods (and their given options) that run on `model`, in the config's order."""
        return {k: v for k, v in self.methods.items() if model.methods is None or k in model.methods}

    def plans(self) -> list[tuple[DatasetSpec, ModelSpec, list[str]]]:
        """(dataset, model, the methods run on it) for every plan."""
        return [(d, m, list(self.methods_for(m))) for d, m in self.pairs()]

    def resolved_methods(self) -> dict[str, dict[str, Any]]:
        """method → every option with its value (defaults filled in): what produces the rows."""
        return {k: method_spec(method_base(k)).resolved(v) for k, v in self.methods.items()}

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


def _named_options(raw, where: str, registry: Mapping, what: str, validate,
                   base=lambda key: key) -> tuple[dict, list[str]]:
    """`{key: options}` (or a list of keys) checked key by key; (validated given options, problems).
    base: the registered name a key stands for (a method variant's base method)."""
    if isinstance(raw, list):
        if not all(isinstance(k, str) for k in raw):
            return {}, [f"{where}: a list must hold {what} names, got {raw!r}"]
        raw = {k: {} for k in raw}
    if not isinstance(raw, Mapping) or not raw:
        return {}, [f"{where}: must be a non-empty mapping {what} -> options; valid: {', '.join(registry)}"]
    out, errors = {}, []
    for key, opts in raw.items():
        if not isinstance(key, str) or base(key) not in registry:
            errors.append(f"{where}.{key}: unknown {what}; valid: {', '.join(registry)}")
            continue
        if key != base(key) and not _NAME.match(key[len(base(key)) + 1:]):
            errors.append(f"{where}.{key}: a variant is `{base(key)}{VARIANT_SEP}NAME`, NAME of letters, digits, "
                          "'_', '-', '.' (it names the rows' method)")
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
    keys = [_entry_keys(m) for m in models]
    for i, m in enumerate(models):
        for key in keys[i]:
            if any(key in earlier for earlier in keys[:i]):
                errors.append(f"models[{i}].key: {key!r} is used twice; give one of them another key")
        if isinstance(m.get("name"), str) and not m.get("layer") and not m.get("layers") \
                and recipe(m["name"]).layer is None:
            errors.append(f"models[{i}].layer: {m['name']!r} is not a built-in model ({', '.join(available_models())}): "
                          "name its target layer")
        errors += _unknown_layers(m, i)
        listed = m.get("methods")
        if isinstance(listed, list) and isinstance(raw.get("methods"), (Mapping, list)):
            errors += [f"models[{i}].methods: {name!r} is not a method of this run; methods: {list(raw['methods'])}"
                       for name in listed if name not in raw["methods"]]
        wanted = m.get("datasets")
        if datasets and isinstance(wanted, list):
            errors += [f"models[{i}].datasets: {name!r} is not a dataset of this run; datasets: {datasets}"
                       for name in wanted if name not in datasets]
    errors += _unservable_pairs(raw, models)
    errors += _metrics_that_cannot_run(raw, models)
    if datasets and models and not any(not isinstance(m.get("datasets"), list) or set(m["datasets"]) & set(datasets)
                                       for m in models):
        errors.append("models: no model applies to any dataset")
    return errors


def _entry_keys(m: Mapping) -> list:
    """The model keys a raw entry yields (one per layer with `layers`)."""
    key = m.get("key") or default_model_key(m)
    layers = m.get("layers")
    if isinstance(layers, list) and not m.get("layer"):
        return [f"{key}@{layer}" for layer in layers]
    return [key]


@functools.lru_cache(maxsize=32)
def _module_names(name: str) -> frozenset[str] | None:
    """The module paths of a torchvision or timm architecture, built on the meta device (no
    weights, no memory, ~0.1 s); None when it cannot be built that way (then the actor tells)."""
    try:
        built = meta_network(name)
    except Exception:  # noqa: BLE001  (not buildable on meta: the actor tells)
        return None
    return frozenset(n for n, _ in built.named_modules() if n) if built is not None else None


def _unknown_layers(m: Mapping, i: int) -> list[str]:
    """A layer the network does not have would fail every row on the cluster: refuse it here."""
    if not isinstance(m.get("name"), str):
        return []
    given = [("layer", m.get("layer"))] if isinstance(m.get("layer"), str) else []
    if isinstance(m.get("layers"), list):
        given += [(f"layers[{j}]", layer) for j, layer in enumerate(m["layers"]) if isinstance(layer, str)]
    if not given:
        return []
    names = _module_names(recipe(m["name"]).name)
    if names is None:
        return []
    def near(layer: str) -> str:  # the modules beside where the name points, else the top level
        parent = layer.rpartition(".")[0]
        siblings = sorted((n for n in names if n.rpartition(".")[0] == parent), key=_natural)
        siblings = siblings or sorted((n for n in names if "." not in n), key=_natural)
        return ", ".join(siblings[:12]) + (", …" if len(siblings) > 12 else "")

    return [f"models[{i}].{where}: {layer!r} is not a module of {m['name']!r}; e.g. {near(layer)}"
            for where, layer in given if layer not in names]


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _unservable_pairs(raw: Mapping, models: list[Mapping]) -> list[str]:
    """A method paired with a model it cannot serve (e.g. attention methods on a CNN) would only
    give rows of errors on the cluster: refuse the pair here, where the recipe can tell."""
    methods = raw.get("methods") if isinstance(raw.get("methods"), Mapping) else {}
    errors = []
    for key in methods:
        base = method_base(key) if isinstance(key, str) else None
        needs = method_spec(base).requires if base in registered_methods() else None
        if needs is None:
            continue
        for i, m in enumerate(models):
            listed = m.get("methods")
            if not isinstance(m.get("name"), str) or (isinstance(listed, list) and key not in listed):
                continue
            layers = m.get("layers") if isinstance(m.get("layers"), list) else [m.get("layer")]
            if any(needs.serves_recipe(recipe(m["name"], layer=layer)) is False for layer in layers):
                errors.append(f"methods.{key}: needs {needs.name}, which models[{i}] ({m['name']!r}) does not have; "
                              f"it accepts {needs.accepts} (list the methods this model runs in models[{i}].methods)")
    return errors


def _metrics_that_cannot_run(raw: Mapping, models: list[Mapping]) -> list[str]:
    """Metric options that only the input size or the model can refute (AOPC's patch size must
    tile the input; the sanity check cannot randomise more blocks than the model has): refused
    here rather than as rows of errors on the cluster."""
    from opticam_core.metrics import check_aopc_input_size
    from opticam_core.models.randomize import check_blocks

    given = raw.get("metrics")
    given = given if isinstance(given, Mapping) else {g: None for g in given} if isinstance(given, list) else {}
    errors: list[str] = []
    if "aopc" in given:
        from .decode import geometry

        sizes = set()
        for d in _entries(raw, "datasets"):
            for m in models:
                try:  # the plan's input size, as the decode stage will make it
                    sizes.add(geometry(m, d.get("preprocess"))["size"])
                except Exception:  # noqa: BLE001  (a bad dataset or model entry reports its own error)
                    continue
        for size in sorted(sizes):
            try:
                check_aopc_input_size(given["aopc"], size)
            except OptionsError as err:
                errors += err.problems
            except Exception:  # noqa: BLE001  (bad aopc options: reported by the group's validation)
                pass
    if "sanity" in given:
        try:
            blocks = METRIC_GROUPS["sanity"].kwargs(given["sanity"])["blocks"]
        except Exception:  # noqa: BLE001  (reported by the group's validation)
            blocks = None
        for i, m in enumerate(models):
            if blocks is None or not isinstance(m.get("name"), str):
                continue
            try:
                check_blocks(m["name"], blocks, where=f"metrics.sanity.blocks (models[{i}])")
            except OptionsError as err:
                errors += err.problems
            except Exception as err:  # noqa: BLE001  (an architecture the sanity check does not know)
                errors.append(f"metrics.sanity: models[{i}] ({m['name']!r}): {err}")
    return sorted(set(errors), key=errors.index)


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
                                     lambda k, o: method_spec(method_base(k)).validate(o, f"methods.{k}"),
                                     base=method_base)
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
