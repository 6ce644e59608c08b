"""The fine-tuning configuration: YAML in, a validated `FinetuneConfig` out, before Ray starts.

Validated like the run config (`pipeline.config`): pydantic models with the same typed fields,
every error names its field path (`stages[1].lr`, `data.val.uri`) and all errors come together.

The paper's recipe (PAPER.md, "Medical recipe"): stage 1 trains only the classifier, stage 2 the
whole network with SGD momentum 0.9, lr 1e-5, 50 epochs; images resized to 224×224. What the
paper does not state (stage-1 optimiser and epochs, batch size, weight decay, schedule,
augmentation) are the defaults below, chosen plainly: SGD momentum 0.9, no weight decay, a
constant lr, no augmentation, batch size 32.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import annotated_types as at
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from opticam_core.options import (
    Bool,
    Int,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    problems,
)
from pipeline.config import ConfigError, Name, Text
from pipeline.preprocess import PreprocessSpec
from pipeline.storage import has_credentials, redact

SPLITS = ("train", "val", "test")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentSpec(_Spec):
    """None by default: the paper is silent. Flips are drawn per image from the run's seed."""

    hflip: Bool = False
    vflip: Bool = False


class ModelSpec(_Spec):
    name: Text
    key: Name | None = None             # the model's key in the printed run-config entry
    weights: str | None = "default"     # ImageNet weights (the model's pretrained set); null: random
    num_classes: Annotated[Int, at.Ge(2)]
    layer: Text | None = None           # target layer for the evaluation (built-ins have one)


class SplitSpec(_Spec):
    uri: Text
    split: Text                         # the samples' `split` value to read


class DataSpec(_Spec):
    train: SplitSpec
    val: SplitSpec
    test: SplitSpec

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        """`data: URI` (one ingest holding the three splits) or `train: URI` per split."""
        if isinstance(data, str):
            data = {s: data for s in SPLITS}
        if isinstance(data, Mapping):
            data = {k: ({"uri": v, "split": k} if isinstance(v, str) else
                        {"split": k, **v} if isinstance(v, Mapping) else v) for k, v in data.items()}
        return data


class StageSpec(_Spec):
    name: Name | None = None
    train: Literal["head", "all"]       # head: the last linear classifier only, the rest frozen
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat
    momentum: NonNegativeFloat = 0.9    # SGD only
    weight_decay: NonNegativeFloat = 0.0
    epochs: NonNegativeInt
    batch_size: PositiveInt = 32        # global: split evenly across the workers


class ComputeSpec(_Spec):
    workers: PositiveInt = 1            # Ray Train workers (DDP ranks); one per GPU
    gpus: Bool = False                  # one GPU per worker
    cpus_per_worker: PositiveInt = 1    # also the threads that decode images
    max_failures: NonNegativeInt = 3    # worker failures a run survives (restart from the last checkpoint)


class FinetuneConfig(_Spec):
    name: Name
    output: Text
    model: ModelSpec
    data: DataSpec
    stages: Annotated[list[StageSpec], at.MinLen(1)]
    preprocess: PreprocessSpec = PreprocessSpec()
    augment: AugmentSpec = AugmentSpec()
    seed: Int = 0
    compute: ComputeSpec = ComputeSpec()

    @model_validator(mode="after")
    def _trains_something(self):
        if sum(s.epochs for s in self.stages) < 1:
            raise ValueError("stages: no epochs to train (every stage has epochs: 0)")
        return self

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def stage_of(self, epoch: int) -> int:
        """The stage index that global epoch `epoch` (0-based) belongs to."""
        end = 0
        for i, s in enumerate(self.stages):
            end += s.epochs
            if epoch < end:
                return i
        raise IndexError(epoch)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _cross_checks(config: FinetuneConfig) -> list[str]:
    errors = []
    for i, s in enumerate(config.stages):
        if s.batch_size % config.compute.workers:
            errors.append(f"stages[{i}].batch_size: {s.batch_size} does not split evenly across "
                          f"compute.workers {config.compute.workers}")
        if s.optimizer == "adam" and "momentum" in s.model_fields_set:
            errors.append(f"stages[{i}].momentum: applies to optimizer sgd only")
    return errors


def _uris_with_credentials(raw: dict) -> list[str]:
    errors = []
    places = [("output", raw, "output")]
    data = raw.get("data")
    if isinstance(data, str):
        places.append(("data", raw, "data"))
    elif isinstance(data, Mapping):
        for s in SPLITS:
            v = data.get(s)
            if isinstance(v, str):
                places.append((f"data.{s}", data, s))
            elif isinstance(v, Mapping):
                places.append((f"data.{s}.uri", v, "uri"))
    for where, holder, key in places:
        value = holder.get(key)
        if isinstance(value, str) and has_credentials(value):
            errors.append(f"{where}: credentials in a URI are not used and would be copied into logs; "
                          "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead")
            holder[key] = redact(value)
    return errors


def parse_config(raw: Mapping[str, Any], *, output: str | None = None) -> FinetuneConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"invalid finetune config:\n  config: must be a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    if output:
        raw["output"] = output
    if isinstance(raw.get("data"), Mapping):
        raw["data"] = dict(raw["data"])
        for s in SPLITS:
            if isinstance(raw["data"].get(s), Mapping):
                raw["data"][s] = dict(raw["data"][s])
    errors = _uris_with_credentials(raw)
    try:
        config = FinetuneConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid finetune config:\n  " + "\n  ".join(problems(err, "", FinetuneConfig) + errors)) from None
    errors += _cross_checks(config)
    if errors:
        raise ConfigError("invalid finetune config:\n  " + "\n  ".join(errors))
    return config


def load_config(source, *, output: str | None = None) -> FinetuneConfig:
    """A finetune config from a YAML file path, YAML text, or a mapping."""
    if isinstance(source, Mapping):
        return parse_config(source, output=output)
    path = Path(str(source))
    try:
        is_file = path.is_file()
    except OSError:
        is_file = False
    if not is_file and "\n" not in str(source) and str(source).endswith((".yaml", ".yml")):
        raise ConfigError(f"config file not found: {source}")
    text = path.read_text() if is_file else str(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config is not valid YAML: {err}") from err
    return parse_config(raw, output=output)
