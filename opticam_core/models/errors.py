"""What the model zoo raises."""


class ModelError(ValueError):
    """A model, layer, weights or checkpoint that cannot be used; the message says why."""


class WeightsUnavailableError(ModelError, RuntimeError):
    """Pretrained weights could not be fetched (typically: no network)."""
