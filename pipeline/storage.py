"""Where samples and results live: a local path or an ``s3://bucket/key`` URI, behind one set of
helpers, so no other module needs to know which.

Why s3fs wrapped in pyarrow's ``PyFileSystem(FSSpecHandler(...))`` rather than pyarrow's own
``S3FileSystem``: botocore (and so s3fs) reads credentials, profiles and the standard endpoint
variables ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, while pyarrow 26's native client honours
``AWS_ENDPOINT_URL`` only; with just ``AWS_ENDPOINT_URL_S3`` set it silently goes to real AWS.
The wrapped filesystem pickles by its constructor arguments, so Ray tasks and actors rebuild it
on their own node (``ray.data.read_parquet(path, filesystem=fs)`` / ``write_parquet`` work with
it). The endpoint is resolved here, on the driver, and passed explicitly, so it travels with the
filesystem into every worker; credentials are deliberately *not* passed: each worker resolves
them from its own environment, config files or instance role, so they never sit in a pickle.

A Ray cluster operator therefore sets, on every node (or in the job's ``runtime_env.env_vars``):
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``), or ``AWS_PROFILE`` with
the files, or nothing on AWS with an instance role / IRSA; ``AWS_DEFAULT_REGION`` where the bucket
needs it; ``AWS_ENDPOINT_URL`` for MinIO or another S3-compatible store. A local ``ray.init``
starts workers that inherit the driver's environment, so nothing is needed there.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: `opticam report` should not pay for s3fs
    import fsspec
    import pyarrow.fs

S3_SCHEMES = ("s3", "s3a", "s3n")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


def split_uri(uri: str) -> tuple[str | None, str]:
    """``s3://b/k`` -> ``("s3", "b/k")``; ``file:///x`` and plain paths -> ``(None, "/x")``."""
    uri = os.fspath(uri)
    m = _SCHEME.match(uri)
    if not m:
        return None, uri
    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme in ("file", "local"):
        return None, rest if rest.startswith("/") else "/" + rest
    return scheme, rest


def is_remote(uri: str) -> bool:
    """True for anything that is not a path on this machine's file system."""
    return split_uri(uri)[0] is not None


def is_s3(uri: str) -> bool:
    return split_uri(uri)[0] in S3_SCHEMES


def endpoint_url() -> str | None:
    """The S3 endpoint the standard AWS variables name: ``AWS_ENDPOINT_URL_S3`` first, then
    ``AWS_ENDPOINT_URL`` (botocore's precedence), unless ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``
    is true. ``None`` means AWS itself (or an endpoint from the AWS config file, which botocore
    resolves on its own)."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def s3_options() -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem``. The listing cache is off: results and
    samples are written by other processes (Ray workers), and a stale listing in the driver
    would hide them."""
    options: dict = {"use_listings_cache": False}
    endpoint = endpoint_url()
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/@\s]+:[^@\s]*|[^/@:\s]+)@")


def has_credentials(uri: str) -> bool:
    """Whether `uri` carries user[:secret]@ (an AWS secret key may hold "/")."""
    return bool(_USERINFO.match(str(uri)))


def fsspec_filesystem(uri: str) -> tuple["fsspec.AbstractFileSystem", str]:
    """(fsspec file system, path inside it) for a local path or a remote URI."""
    import fsspec

    scheme, path = split_uri(uri)
    if scheme is None:
        return fsspec.filesystem("file"), os.path.abspath(path)
    if scheme in S3_SCHEMES:
        if has_credentials(uri):
            # S3 would take them for part of the bucket name and quote them back in its error
            raise ValueError(f"{redact(uri)}: credentials in an s3:// URI are not used; set "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead")
        return fsspec.filesystem("s3", **s3_options()), path.rstrip("/")
    fs = fsspec.filesystem(scheme)
    return fs, fs._strip_protocol(uri)


def filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """(pyarrow file system, path inside it), for ``pyarrow.parquet``/``pyarrow.dataset`` and for
    ``ray.data.read_parquet(path, filesystem=fs)`` / ``Dataset.write_parquet(path, filesystem=fs)``.
    Local paths get pyarrow's ``LocalFileSystem`` and an absolute path; ``s3://bucket/key`` gets
    s3fs behind ``PyFileSystem(FSSpecHandler)`` and ``bucket/key``."""
    import pyarrow.fs as pafs

    scheme, _ = split_uri(uri)
    fs, path = fsspec_filesystem(uri)
    if scheme is None:
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with ``/`` (keeps the scheme)."""
    uri = os.fspath(uri)
    scheme, path = split_uri(uri)
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if scheme is None:
        return os.path.join(path, *clean)
    joined = posixpath.join(path.rstrip("/"), *clean) if clean else path
    return f"{scheme}://{joined}"


def _uri(scheme: str | None, path: str) -> str:
    return path if scheme is None else f"{scheme}://{path}"


def exists(uri: str) -> bool:
    """A file, or a directory / S3 prefix holding at least one object."""
    fs, path = fsspec_filesystem(uri)
    return bool(fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = fsspec_filesystem(uri)
    return bool(fs.isdir(path))


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_filesystem(uri)
    return fs.cat_file(path)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, creating local parent directories (S3 has none to create)."""
    fs, path = fsspec_filesystem(uri)
    if split_uri(uri)[0] is None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fs.pipe_file(path, bytes(data))


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def listdir(uri: str) -> list[str]:
    """Immediate children (files and directories / prefixes) as full URIs, sorted; [] when the
    directory does not exist."""
    scheme, _ = split_uri(uri)
    fs, path = fsspec_filesystem(uri)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(_uri(scheme, n) for n in names if n.rstrip("/") != path.rstrip("/"))


def find(uri: str) -> list[str]:
    """Every file below a directory / prefix, recursively, as full URIs, sorted."""
    scheme, _ = split_uri(uri)
    fs, path = fsspec_filesystem(uri)
    try:
        names = fs.find(path, withdirs=False, detail=False)
    except FileNotFoundError:
        return []
    return sorted(_uri(scheme, n) for n in names)


def glob(pattern: str) -> list[str]:
    """Files matching a glob (``*``, ``**``, ``?``, ``[...]``), as full URIs, sorted."""
    scheme, _ = split_uri(pattern)
    fs, path = fsspec_filesystem(pattern)
    return sorted(_uri(scheme, n) for n in fs.glob(path))


def rm(uri: str, recursive: bool = False, missing_ok: bool = True) -> None:
    """Remove a file, or a directory / prefix with everything below it when ``recursive``."""
    fs, path = fsspec_filesystem(uri)
    if not missing_ok and not fs.exists(path):  # S3 deletes of missing keys succeed silently
        raise FileNotFoundError(redact(uri))
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        if not missing_ok:
            raise


def makedirs(uri: str) -> None:
    """Create a local directory; no-op on object stores (prefixes need no creating)."""
    if split_uri(uri)[0] is None:
        os.makedirs(split_uri(uri)[1], exist_ok=True)


# --- credentials never leave in text -------------------------------------------------------

_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_PATTERNS = [
    # user:password@ in any URL (s3://KEY:SECRET@bucket, http://user:pass@minio:9000); AWS secret
    # keys may hold "/", so the password part may too
    (re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@:\"']+:[^\s@\"']+@"), r"\g<scheme>***@"),
    # presigned-URL and header parameters
    (re.compile(r"(?i)(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s\"']+"), r"\1***"),
    (re.compile(r"(?i)((?:AWSAccessKeyId|Signature)=)[^&\s\"']+"), r"\1***"),
    (re.compile(r"(?i)(Credential=)[^,\s\"']+"), r"\1***"),
    # key = value / key: value / "key": "value" forms of the usual names
    (re.compile(r"(?i)([\"']?\b(?:aws_)?(?:secret_access_key|secret_key|session_token|security_token|secret|password|token)"
                r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',}]+"), r"\1***"),
    # access key ids (long-term AKIA…, temporary ASIA…)
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b"), "***"),
]


def redact(text: object) -> str:
    """``text`` with credentials masked: the values of the AWS credential variables currently
    set, credentials embedded in URLs, presigned-URL signatures, ``secret=...``-style pairs and
    anything shaped like an AWS access key id. Apply to everything printed or written that
    could carry a URI, an exception message or a configuration."""
    out = str(text)
    for var in _SECRET_VARS:
        value = os.environ.get(var, "")
        if len(value) >= 6:  # short dummy values would mask ordinary words
            out = out.replace(value, "***")
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out
