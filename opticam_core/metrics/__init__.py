"""Per-image metrics (SPEC §4) and their aggregation into the paper's numbers."""

from .fields import FIELDS

__all__ = ["FIELDS"]
