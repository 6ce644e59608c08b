"""Finding a run and reading its rows with pyarrow (never Ray), locally or on s3://.

Layout written by the job: ``OUTPUT/run=RUN_ID/dataset=D/model=M/*.parquet`` plus
``OUTPUT/run=RUN_ID/_run.json``. Rows carry ``run_id``/``dataset``/``model`` as columns, so files
are read *without* hive partitioning: the directory names are only used to group files.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import DEFAULTS, RESULTS, ROW_KEY

MANIFEST = "_run.json"
RUN_PREFIX = "run="

#: Columns that hold one value per image and feed `aggregate` (everything but the heavy lists).
HEAVY = ("map_png", "insertion_curve", "deletion_curve", "objective_history")


class RunNotFound(FileNotFoundError):
    """The URI holds no run (no ``_run.json`` and no Parquet files)."""


def _protocol_prefix(uri: str) -> str:
    """``s3://`` for a remote URI, "" for a local path: what puts a filesystem path back into a URI."""
    scheme, _ = storage.split_uri(uri)
    return "" if scheme is None else f"{scheme}://"


def _parse_time(value) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass
class Run:
    """One run: where it is, its manifest, and its Parquet files grouped by partition folder."""

    uri: str                      # as the user gave it (protocol kept), pointing at run=ID/
    fs: object = field(repr=False)
    path: str = ""                # `uri` without the protocol, for `fs`
    manifest: dict = field(default_factory=dict)

    @property
    def protocol_prefix(self) -> str:
        return _protocol_prefix(self.uri)

    @property
    def run_id(self) -> str:
        rid = self.manifest.get("run_id")
        if rid:
            return str(rid)
        base = posixpath.basename(self.path.rstrip("/"))
        return base[len(RUN_PREFIX):] if base.startswith(RUN_PREFIX) else base

    @property
    def root(self) -> str:
        """The output root holding this run's folder (``OUTPUT``), protocol kept."""
        return self.protocol_prefix + posixpath.dirname(self.path.rstrip("/"))

    @property
    def started(self) -> datetime | None:
        return _parse_time(self.manifest.get("started"))

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.uri)

    @cached_property
    def files(self) -> list[str]:
        found = self.fs.find(self.path) if self.fs.exists(self.path) else []
        return sorted(f for f in found if f.endswith(".parquet")
                      and not any(p.startswith((".", "_")) for p in f[len(self.path):].split("/") if p))

    def datasets(self) -> dict[str, dict]:
        """Dataset name → its entry in the resolved config (``uri`` of its samples, …)."""
        config = self.manifest.get("config") or self.manifest
        entries = config.get("datasets") or []
        if isinstance(entries, dict):  # {name: {...}} also accepted
            entries = [{"name": k, **(v or {})} for k, v in entries.items()]
        return {str(e.get("name")): dict(e) for e in entries if isinstance(e, dict) and e.get("name")}


def _read_manifest(fs, path: str) -> dict | None:
    mpath = storage.join(path, MANIFEST)
    if not fs.exists(mpath):
        return None
    with fs.open(mpath, "rb") as fh:
        return json.loads(fh.read().decode("utf-8"))


def list_runs(root_uri: str) -> list[Run]:
    """Every run folder (``run=*``) directly under an output root, oldest first.

    Order: the manifest's ``started`` (runs without one sort first, by name)."""
    fs, root = storage.fsspec_filesystem(root_uri)
    prefix = _protocol_prefix(root_uri)
    runs = []
    if not fs.exists(root):
        return runs
    for entry in fs.ls(root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry.get("type") != "directory" or not name.startswith(RUN_PREFIX):
            continue
        path = entry["name"].rstrip("/")
        runs.append(Run(uri=prefix + path, fs=fs, path=path, manifest=_read_manifest(fs, path) or {}))
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(runs, key=lambda r: (r.started or epoch, r.run_id))


def open_run(uri: str) -> Run:
    """The run at `uri`: a ``run=ID`` folder, or an output root (then its latest run).

    Raises RunNotFound when there is neither a manifest nor a Parquet file."""
    fs, path = storage.fsspec_filesystem(uri)
    path = path.rstrip("/")
    manifest = _read_manifest(fs, path)
    run = Run(uri=uri.rstrip("/"), fs=fs, path=path, manifest=manifest or {})
    if manifest is not None:
        return run
    runs = list_runs(uri)
    if runs:  # an output root: its latest run
        return runs[-1]
    if run.files:  # a run folder without a manifest (e.g. a job killed before writing it)
        return run
    raise RunNotFound(f"no run at {uri}: expected {MANIFEST} or Parquet result files "
                      f"(OUTPUT/run=RUN_ID/dataset=D/model=M/*.parquet), or an output root holding run=* folders")


def previous_run(run: Run) -> Run | None:
    """The latest run under the same output root that started before `run` (manifest ``started``)."""
    candidates = [r for r in list_runs(run.root) if r.path.rstrip("/") != run.path.rstrip("/")]
    if run.started is not None:
        candidates = [r for r in candidates if r.started is not None and r.started < run.started]
    else:  # without timestamps, fall back to run-id order
        candidates = [r for r in candidates if r.run_id < run.run_id]
    return candidates[-1] if candidates else None


# --------------------------------------------------------------------------------------------
# Rows


def _conform(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """Select `columns` in RESULTS order and types; a column a file lacks becomes nulls."""
    arrays = []
    for name in columns:
        typ = RESULTS.field(name).type
        if name in table.column_names:
            col = table.column(name)
            col = col if col.type == typ else col.cast(typ)
            if name in DEFAULTS and col.null_count:  # a writer that left it null means the same
                col = col.fill_null(pa.scalar(DEFAULTS[name], typ))
            arrays.append(col)
        elif name in DEFAULTS:  # rows written before the column existed: what its absence meant
            arrays.append(pa.array([DEFAULTS[name]] * table.num_rows, typ))
        else:
            arrays.append(pa.nulls(table.num_rows, typ))
    return pa.table(arrays, schema=pa.schema([RESULTS.field(c) for c in columns]))


def read_table(run: Run, columns: Iterable[str] | None = None, *, maps: bool = False,
               curves: bool = False, files: Sequence[str] | None = None,
               where: dict | None = None) -> pa.Table:
    """The run's rows as one pyarrow Table in the RESULTS schema (subset of columns).

    Default columns: everything except the heavy ones (maps, curves, histories), which are
    asked for with `maps=True` / `curves=True` or by naming them. `where` filters on equality,
    e.g. ``{"method": ["opticam", "gradcam"]}``. Duplicate row keys (a failed row and its retry)
    keep the successful, most recent one.
    """
    if columns is None:
        columns = [f.name for f in RESULTS if f.name not in HEAVY
                   or (maps and f.name == "map_png") or (curves and f.name != "map_png")]
    columns = list(dict.fromkeys(list(columns) + [c for c in (*ROW_KEY, "error", "created") if c not in columns]))
    unknown = [c for c in columns if c not in RESULTS.names]
    if unknown:
        raise KeyError(f"not result columns: {unknown}")
    parts = [t for t in iter_tables(run, columns, files=files, where=where)]
    if not parts:
        return pa.schema([RESULTS.field(c) for c in columns]).empty_table()
    table = pa.concat_tables(parts)
    return deduplicate(table)


def _allowed(where: dict | None) -> dict:
    return {col: (pa.array([v] if isinstance(v, (str, int)) else list(v), type=RESULTS.field(col).type))
            for col, v in (where or {}).items()}


def iter_tables(run: Run, columns: Sequence[str], *, files: Sequence[str] | None = None,
                where: dict | None = None):
    """The rows, one row group at a time, conformed to RESULTS (see `read_table`).

    With `where`, a row group's filter columns are read first and the rest only when one of its
    rows matches, so picking a few maps out of a large run reads little more than those maps."""
    columns = list(columns)
    allowed = _allowed(where)
    for f in (run.files if files is None else files):
        pf = pq.ParquetFile(f, filesystem=run.fs)
        names = pf.schema_arrow.names
        present = [c for c in columns if c in names]
        for g in range(pf.num_row_groups):
            if allowed:
                keys = _conform(pf.read_row_group(g, columns=[c for c in allowed if c in names]), list(allowed))
                mask = None
                for col, values in allowed.items():
                    m = pc.is_in(keys.column(col), value_set=values)
                    mask = m if mask is None else pc.and_(mask, m)
                if not pc.any(mask).as_py():
                    continue
                t = _conform(pf.read_row_group(g, columns=present), columns).filter(mask)
            else:
                t = _conform(pf.read_row_group(g, columns=present), columns)
            yield t


def deduplicate(table: pa.Table) -> pa.Table:
    """One row per ROW_KEY: a successful row beats a failed one, then the newest `created`."""
    if table.num_rows == 0:
        return table
    key = pa.table({c: table.column(c) for c in ROW_KEY}).to_pandas()
    if not key.duplicated().any():
        return table
    key["_ok"] = table.column("error").is_null().to_numpy(zero_copy_only=False)
    created = table.column("created").cast(pa.int64()).fill_null(np.iinfo(np.int64).min)
    key["_t"] = created.to_numpy()
    key["_i"] = np.arange(len(key))
    keep = key.sort_values(["_ok", "_t", "_i"]).drop_duplicates(list(ROW_KEY), keep="last")["_i"]
    return table.take(pa.array(np.sort(keep.to_numpy())))


def read_rows(uri_or_run, columns: Iterable[str] | None = None, **kwargs):
    """The run's rows as a pandas DataFrame (list columns as numpy arrays, maps as bytes)."""
    run = uri_or_run if isinstance(uri_or_run, Run) else open_run(uri_or_run)
    return read_table(run, columns, **kwargs).to_pandas()


def read_samples(uri: str, sample_ids: Iterable[str] | None = None) -> pa.Table:
    """Samples (the SAMPLES schema) from a dataset's ``uri``, optionally only some sample ids."""
    fs, path = storage.fsspec_filesystem(uri)
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    else:
        files = [path]
    wanted = None if sample_ids is None else pa.array(sorted(set(map(str, sample_ids))), type=pa.string())
    parts = []
    for f in files:
        t = pq.ParquetFile(f, filesystem=fs).read()
        if wanted is not None:
            t = t.filter(pc.is_in(t.column("sample_id"), value_set=wanted))
        parts.append(t)
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
