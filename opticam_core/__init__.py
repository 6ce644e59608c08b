"""opticam_core: saliency methods and their metrics, in torch, batched on the device.

No Ray, no datasets, no result files: `pipeline` builds the job on top of this.
"""

from importlib.metadata import PackageNotFoundError, version

from .maps import fake_cam, normalize, upsample
from .methods import METHODS, Explanation, explain, method_options
from .models import (
    BUILTIN,
    ModelBundle,
    ModelError,
    WeightsUnavailableError,
    available_models,
    load_model,
    wrap_model,
)

try:
    __version__ = version("opticam")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BUILTIN", "METHODS", "Explanation", "ModelBundle", "ModelError", "WeightsUnavailableError",
    "available_models", "explain", "fake_cam", "load_model", "method_options", "normalize", "upsample",
    "wrap_model",
]
