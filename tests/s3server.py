"""A real S3 endpoint on 127.0.0.1 for tests: moto's server in a subprocess (as s3fs's own test
suite runs it), with the environment pointed at it and nowhere else.

``tests/conftest.py`` registers this module as a plugin (``pytest_plugins``), so any test can ask::

    def test_something(s3_prefix):           # a fresh s3://opticam-test/<test>-<n>/ per test
        ...

``s3_server`` (session-scoped) starts the server once, sets for this process *and every child
it starts afterwards* (subprocesses, ``ray start``, workers of a local ``ray.init``)
``AWS_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL_S3`` to the server, dummy credentials, a region,
``AWS_EC2_METADATA_DISABLED=true``, empty AWS config/credential files, and removes profile /
token / container-credential variables, so no request can reach real AWS or a developer's
account. It creates the bucket ``opticam-test`` and stops the server at the end of the session.
Start it *before* a local Ray instance (request it in the Ray fixture, or put it first), or pass
``runtime_env={"env_vars": s3_server.env}``: workers of an already running Ray never see
variables set later. ``s3_server.env`` is also what to hand to ``subprocess``/``ray job submit``.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from tests._peers import require

BUCKET = "opticam-test"
#: Distinctive dummy credentials, so tests can assert they never appear in output.
ACCESS_KEY = "AKIAOPTICAMMOTO00001"
SECRET_KEY = "opticam-moto-secret-7f3b9c2e41d0a6"

_REMOVED = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_CA_BUNDLE",
)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count, repr=False)

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        key = "/".join(p.strip("/") for p in parts if p)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """All object keys under a prefix (straight from the server, no client-side cache)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def fresh_prefix(self, name: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name)[-60:].strip("-") or "t"
        return self.uri(f"{safe}-{next(self._counter)}") + "/"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(endpoint: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(endpoint + "/moto-api/", timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


# `python -m moto.server`, plus a watchdog: if the test process dies without tearing down (killed
# by a timeout, say), the server exits too instead of lingering.
_MOTO_MAIN = """
import os, sys, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"""


def start_moto(log_path: str, attempts: int = 3, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` on a free loopback port; (process, endpoint URL)."""
    last = ""
    for _ in range(attempts):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-c", _MOTO_MAIN, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _ready(endpoint):
                return proc, endpoint
            time.sleep(0.2)
        last = f"moto server on port {port} {'exited' if proc.poll() is not None else 'did not answer'}"
        stop_moto(proc)
    with open(log_path, "rb") as f:
        tail = f.read()[-2000:].decode(errors="replace")
    raise RuntimeError(f"{last}; log tail:\n{tail}")


def stop_moto(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def loopback_env(endpoint: str, config_dir: str) -> dict[str, str]:
    """The variables that point every AWS client (botocore, s3fs, pyarrow's native S3, the AWS
    CLI) at ``endpoint`` with dummy credentials and nothing else to fall back on."""
    empty = os.path.join(config_dir, "aws-empty")
    open(empty, "a").close()
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost") if x)
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": empty,
        "AWS_SHARED_CREDENTIALS_FILE": empty,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


# One server per test process, however many modules import the fixture: pytest registers an
# imported fixture once per importing module, so the state lives here, counted by users.
_SHARED: dict = {"server": None, "proc": None, "patch": None, "users": 0}


def _acquire(tmp_path_factory) -> S3Server:
    if _SHARED["server"] is None:
        workdir = str(tmp_path_factory.mktemp("moto"))
        proc, endpoint = start_moto(os.path.join(workdir, "moto.log"))
        env = loopback_env(endpoint, workdir)
        mp = pytest.MonkeyPatch()
        for var in _REMOVED:
            mp.delenv(var, raising=False)
        for var, value in env.items():
            mp.setenv(var, value)
        server = S3Server(endpoint=endpoint, bucket=BUCKET, env=env)
        _SHARED.update(server=server, proc=proc, patch=mp)
        try:
            server.create_bucket(BUCKET)
        except Exception:
            _SHARED["users"] = 1
            _release()
            raise
    _SHARED["users"] += 1
    return _SHARED["server"]


def _release() -> None:
    _SHARED["users"] -= 1
    if _SHARED["users"] <= 0 and _SHARED["server"] is not None:
        _SHARED["patch"].undo()
        stop_moto(_SHARED["proc"])
        _SHARED.update(server=None, proc=None, patch=None, users=0)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session, with bucket ``opticam-test``."""
    require("moto.server")
    server = _acquire(tmp_path_factory)
    try:
        yield server
    finally:
        _release()


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh, empty ``s3://opticam-test/<test name>-<n>/`` for one test."""
    return s3_server.fresh_prefix(request.node.name)
