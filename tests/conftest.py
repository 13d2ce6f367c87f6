"""Test setup: 8 simulated CPU devices, float32 matmuls, repo on sys.path, and a local GCS
emulator (started on first use) that every gs:// client is pointed at."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "configs"))  # config files' helpers

import gcs_emulator  # noqa: E402

# One emulator per test process (each xdist worker has its own port), named before any
# GCS client is imported: the clients read their settings once.
_EMULATOR = gcs_emulator.Emulator(gcs_emulator.free_port())
os.environ["STORAGE_EMULATOR_HOST"] = _EMULATOR.host
os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)  # derived from the one variable above

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def gcs():
  """The running emulator (`.bucket(name)` -> 'gs://name', `.objects(bucket, prefix)`)."""
  _EMULATOR.start()
  yield _EMULATOR
  _EMULATOR.stop()


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "speed_check: reads XLA's compiled program (HLO text, buffer sizes) to keep a "
    "CPU form fast; a failure after an XLA upgrade is a speed regression, not a wrong result",
  )
