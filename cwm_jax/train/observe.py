"""What a run is doing: goodput, memory, ETA and profiles.

- `Goodput` splits one launch's wall time into buckets (startup, checkpoint restore,
  compile, data wait, step, evaluation, checkpoint save) and adds `lost`: the steps a
  relaunch redid after a preemption or crash (at the previous launch's step time) plus
  the downtime between the previous launch's last record and this launch. Per logged
  interval it gives `goodput/*` metrics; `WORKDIR/goodput.json` keeps every launch's
  totals, so the summary spans relaunches of the same workdir.
- `memory_scalars`: device memory in use and peak where the backend reports it
  (`Device.memory_stats()`: GPU, TPU), the bytes of live arrays on this process's devices
  (every backend, CPU included), and host RSS.
- `Profiler`: a `jax.profiler` trace of `profile.num_steps` steps from
  `profile.start_step`, or on request while running: a new text in
  `WORKDIR/profile.request` (checked at logged steps) or SIGUSR1 to a process. Traces are
  written locally, then uploaded to `WORKDIR/profile/<name>/process_<i>/` (gs:// too),
  where TensorBoard's profiler plugin and Perfetto read them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time

import jax
import psutil
from absl import logging

from cwm_jax import storage

BUCKETS = ("startup", "restore", "compile", "data", "step", "eval", "save")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Goodput:
  """Wall-time buckets of one launch; `lost` from the previous launches in the workdir."""

  def __init__(self, workdir: str, *, enabled: bool = True, save_every_s: float = 0.0):
    self.path = storage.join(workdir, "goodput.json")
    self.enabled = enabled
    # On a bucket every save is an upload: records save at most this often (checkpoints and
    # the end of a stage always do).
    self.save_every_s = save_every_s if storage.is_url(workdir) else 0.0
    self._saved_at = float("-inf")
    self.t_start = time.time()
    self._t0 = time.perf_counter()
    self.total = dict.fromkeys(BUCKETS, 0.0)
    self._interval = dict.fromkeys(BUCKETS, 0.0)
    self._interval_t0 = self._t0
    self._compile = 0.0
    self.launches: list[dict] = []
    if enabled and storage.exists(self.path):
      self.launches = storage.read_json(self.path).get("launches", [])
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    self.lost_s = 0.0
    self.first_step = self.last_step = None

  def _on_event(self, event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT:
      self._compile += duration

  def resumed(self, step: int) -> None:
    """This launch starts at `step`: steps the previous launch logged past it are redone."""
    self.first_step = self.last_step = step
    if not self.launches:
      return
    prev = self.launches[-1]
    steps = max(prev["last_step"] - prev["first_step"], 1)
    redone = max(prev["last_step"] - step, 0)
    self.lost_s = redone * prev["buckets"]["step"] / steps + max(self.t_start - prev["t_last"], 0.0)

  @contextlib.contextmanager
  def timed(self, bucket: str):
    """Adds the block's wall time to `bucket`, less what compiling took inside it (that
    goes to the compile bucket: the buckets never count a second twice)."""
    t, compiled = time.perf_counter(), self._compile
    try:
      yield
    finally:
      self.add(bucket, max(time.perf_counter() - t - (self._compile - compiled), 0.0))

  def add(self, bucket: str, seconds: float) -> None:
    self.total[bucket] += seconds
    self._interval[bucket] += seconds

  def interval(self) -> dict[str, float]:
    """`goodput/*` for the wall time since the last call: the step bucket is what the
    other buckets and compilation leave of it."""
    now = time.perf_counter()
    wall = max(now - self._interval_t0, 1e-9)
    compile_s, self._compile = self._compile, 0.0
    self.total["compile"] += compile_s
    self._interval["compile"] += compile_s
    measured = sum(v for k, v in self._interval.items() if k != "step")
    step_s = max(wall - measured, 0.0)
    self.total["step"] += step_s - self._interval["step"]
    self._interval["step"] = step_s
    out = {f"goodput/{k}_s": v for k, v in self._interval.items()}
    out["goodput/fraction"] = step_s / wall
    self._interval = dict.fromkeys(BUCKETS, 0.0)
    self._interval_t0 = now
    return out

  def record(self) -> dict:
    """This launch's totals, as stored in goodput.json."""
    return {
      "first_step": self.first_step or 0,
      "last_step": self.last_step or 0,
      "t_start": self.t_start,
      "t_last": time.time(),
      "lost_s": self.lost_s,
      "wall_s": time.perf_counter() - self._t0,
      "buckets": dict(self.total),
    }

  def summary(self) -> dict:
    """Every launch of the workdir so far (this one included), bucket by bucket."""
    launches = self.launches + [self.record()]
    buckets = {k: sum(l["buckets"][k] for l in launches) for k in BUCKETS}
    lost = sum(l["lost_s"] for l in launches)
    wall = sum(l["wall_s"] for l in launches) + lost
    return {
      "launches": len(launches),
      "wall_s": wall,
      "lost_s": lost,
      "buckets": buckets,
      "goodput": buckets["step"] / wall if wall else 0.0,
    }

  def save(self, *, if_due: bool = False) -> None:
    """Writes goodput.json; with `if_due`, only once `save_every_s` has passed."""
    now = time.monotonic()
    if if_due and now - self._saved_at < self.save_every_s:
      return
    self._saved_at = now
    if self.enabled:
      storage.write_json(
        self.path,
        {"launches": self.launches + [self.record()], "summary": self.summary()},
        indent=1,
      )

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def memory_scalars() -> dict[str, float]:
  """`memory/*`: device bytes in use and peak (where reported), live-array bytes on this
  process's devices, host RSS."""
  out = {"memory/host_rss_bytes": float(psutil.Process().memory_info().rss)}
  stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
  if stats:
    out["memory/device_bytes_in_use"] = float(max(s.get("bytes_in_use", 0) for s in stats))
    out["memory/device_peak_bytes"] = float(max(s.get("peak_bytes_in_use", 0) for s in stats))
  local = set(jax.local_devices())
  out["memory/live_array_bytes"] = float(
    sum(s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards if s.device in local)
  )
  return out


class Profiler:
  """Captures `jax.profiler` traces of chosen steps into the workdir."""

  def __init__(self, workdir: str, start_step: int = -1, num_steps: int = 5):
    self.workdir, self.start, self.num = workdir, start_step, max(int(num_steps), 1)
    self.request = storage.join(workdir, "profile.request")
    self._served: str | None = None
    self._signalled = threading.Event()
    self._active: tuple[str, str, int] | None = None  # (name, local dir, stop step)
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGUSR1, lambda *_: self._signalled.set())
    if storage.exists(self.request):  # a request older than this launch is not new
      self._served = storage.read_text(self.request)

  def before_step(self, step: int, check_request: bool) -> None:
    """Starts a capture covering steps step+1.. when one is due."""
    if self._active is not None:
      return
    name = None
    if step + 1 == self.start:
      name = f"step_{step + 1}"
    elif self._signalled.is_set():
      self._signalled.clear()
      name = f"signal_step_{step + 1}"
    elif check_request and storage.exists(self.request):
      text = storage.read_text(self.request)
      if text != self._served:
        self._served, name = text, f"request_step_{step + 1}"
    if name is not None:
      local = tempfile.mkdtemp(prefix="cwm-profile-")
      jax.profiler.start_trace(local)
      self._active = (name, local, step + self.num)
      logging.info("profiling steps %d..%d (%s)", step + 1, step + self.num, name)

  def after_step(self, step: int, sync) -> None:
    """Ends a capture once its last step ran (`sync()` waits for the device)."""
    if self._active is None or step < self._active[2]:
      return
    sync()
    self._finish()

  def _finish(self) -> None:
    name, local, _ = self._active
    self._active = None
    jax.profiler.stop_trace()
    dst = storage.join(self.workdir, "profile", name, f"process_{jax.process_index()}")
    storage.upload_tree(local, dst)
    shutil.rmtree(local, ignore_errors=True)
    logging.info("profile written to %s", dst)

  def close(self) -> None:
    if self._active is not None:
      self._finish()
    if self._old is not None:
      signal.signal(signal.SIGUSR1, self._old)


def eta_seconds(step: int, total: int, step_time: float) -> float:
  """Seconds to `total` at `step_time` per step."""
  return max(total - step, 0) * max(step_time, 0.0)
