"""How images become the network's input, when a model was trained with other preprocessing
than the evaluation's default (torchvision's Resize(256) then CenterCrop(224)).

One shape for the fine-tuning config (`preprocess:`) and the run config's datasets
(`datasets[i].preprocess`), so that a model is evaluated on images prepared the way it was
trained: the paper's medical models saw images resized to 224×224 directly (App. E)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from opticam_core.options import PositiveInt


class PreprocessSpec(BaseModel):
    """`resize` alone: resize to resize×resize, aspect not kept (the paper's medical models).
    With `crop`: the shorter side to `resize`, then a centre crop×crop (the evaluation's
    default is resize 256, crop 224)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: PositiveInt = 224
    crop: PositiveInt | None = None

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop is not None and self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self

    def kwargs(self) -> dict:
        """Keyword arguments of `opticam_core.transforms.preprocess` / `transform_boxes`."""
        if self.crop is None:
            return {"resize": (self.resize, self.resize), "size": (self.resize, self.resize)}
        return {"resize": self.resize, "size": (self.crop, self.crop)}

    def fingerprint(self) -> dict:
        """The fields `pipeline.fingerprint` records for the model's default geometry."""
        k = self.kwargs()
        return {"preprocessing.resize": list(k["resize"]) if isinstance(k["resize"], tuple) else k["resize"],
                "preprocessing.size": list(k["size"])}
