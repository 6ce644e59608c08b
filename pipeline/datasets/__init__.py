"""Raw datasets into Parquet samples (DESIGN.md's samples schema, `pipeline.schema.SAMPLES`).

One adapter per downloaded layout lists the images with labels and boxes (`imagenet`,
`chestxray`, `folder` for ImageFolder trees and Kvasir); `writer` turns a slice of that list into
one Parquet shard; `driver.ingest` runs the shards in threads or as Ray tasks and writes the report.
"""

from pipeline.datasets.driver import KINDS, IngestOptions, ingest, summary
from pipeline.datasets.sources import Candidate, IngestError, Listing
from pipeline.datasets.writer import REPORT_NAME, SHARD_NAME

__all__ = ["KINDS", "IngestOptions", "ingest", "summary", "Candidate", "IngestError", "Listing",
           "REPORT_NAME", "SHARD_NAME"]
