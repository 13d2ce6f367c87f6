"""Model architecture: a frozen, validated dataclass with named presets.

`ModelConfig` holds the architecture only (shapes, RoPE, per-layer attention
windows): what a checkpoint's config.json or params.json describes. How the
model runs (dtypes, attention backend, scan, remat) is `execution.Execution`.
It is hashable so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cwm_jax.base import ConfigError, check_fields
from cwm_jax.model import execution


def meta_layer_windows(
  n_layers: int,
  local_window: int,
  global_window: int,
  pattern: int = 4,
  global_last_layer: bool = True,
) -> tuple[int, ...]:
  """Meta's rule: global where `i % pattern == 0`, and the last layer global."""
  windows = [global_window if i % pattern == 0 else local_window for i in range(n_layers)]
  if global_last_layer and n_layers:
    windows[-1] = global_window
  return tuple(windows)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """llama3-style RoPE frequency scaling (CWM technical report)."""

  factor: float = 16.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_context: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """CWM decoder architecture.

  `layer_windows[i]` is the number of keys (the query included) layer i may
  see: `q - k < layer_windows[i]`. Layers whose window equals
  `global_window` are global; others are local.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  layer_windows: tuple[int, ...]
  global_window: int
  norm_eps: float = 1e-5
  rope_theta: float = 1e6
  rope_scaling: RopeScaling | None = RopeScaling()
  max_seq_len: int = 131072

  def __post_init__(self):
    object.__setattr__(self, "layer_windows", tuple(int(w) for w in self.layer_windows))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    errors = []
    for name in (
      "vocab_size",
      "dim",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "head_dim",
      "ffn_dim",
      "global_window",
    ):
      if getattr(self, name) < 1:
        errors.append(f"{name}={getattr(self, name)} must be >= 1")
    if self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads:
      errors.append(
        f"n_heads={self.n_heads} must be divisible by "
        f"n_kv_heads={self.n_kv_heads} (grouped-query attention)"
      )
    if self.head_dim % 2:
      errors.append(f"head_dim={self.head_dim} must be even for RoPE")
    if len(self.layer_windows) != self.n_layers:
      errors.append(
        f"layer_windows has {len(self.layer_windows)} entries but "
        f"n_layers={self.n_layers}; give one window per layer"
      )
    bad = [w for w in self.layer_windows if w < 1]
    if bad:
      errors.append(f"layer_windows has windows < 1: {sorted(set(bad))}")
    if any(w > self.global_window for w in self.layer_windows):
      errors.append(
        f"a layer window exceeds global_window={self.global_window}; raise global_window"
      )
    if errors:
      raise ConfigError("invalid ModelConfig: " + "; ".join(errors))

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  @property
  def global_layers(self) -> tuple[int, ...]:
    return tuple(i for i, w in enumerate(self.layer_windows) if w >= self.global_window)

  def replace(self, **kw: Any) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    """From `to_dict` output; execution fields stored by checkpoints written before
    the architecture/execution split are dropped, anything else unknown is an error."""
    d = {k: v for k, v in d.items() if k not in execution.FIELDS}
    known = {f.name for f in dataclasses.fields(cls)}
    check_fields(d, known, what="ModelConfig fields")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def param_count(self) -> int:
    """Exact parameter count (no biases, untied embeddings)."""
    d, h = self.dim, self.head_dim
    attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
    mlp = 3 * d * self.ffn_dim
    per_layer = attn + mlp + 2 * d
    return self.n_layers * per_layer + 2 * self.vocab_size * d + d

  def effective_windows(self, seq_len: int) -> tuple[int, ...]:
    """Per-layer windows clipped to a sequence length."""
    return tuple(min(w, seq_len) for w in self.layer_windows)


def cwm_32b(**overrides: Any) -> ModelConfig:
  """The released CWM 32B architecture (17 global layers, Meta's pattern)."""
  cfg = dict(
    vocab_size=128256,
    dim=6144,
    n_layers=64,
    n_heads=48,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=21504,
    global_window=131072,
    layer_windows=meta_layer_windows(64, 8192, 131072),
    norm_eps=1e-5,
    rope_theta=1e6,
    rope_scaling=RopeScaling(),
    max_seq_len=131072,
  )
  cfg.update(overrides)
  return ModelConfig(**cfg)


def _cwm_shaped(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int, overrides):
  """A CWM-shaped config: the 32B's vocabulary, head size and window pattern at other widths."""
  cfg = dict(
    vocab_size=128256,
    dim=dim,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=n_kv_heads,
    head_dim=128,
    ffn_dim=ffn_dim,
    global_window=131072,
    layer_windows=meta_layer_windows(n_layers, 8192, 131072),
  )
  cfg.update(overrides)
  return ModelConfig(**cfg)


def cwm_1b(**overrides: Any) -> ModelConfig:
  """A ~1B CWM-shaped model for single-accelerator throughput work."""
  return _cwm_shaped(2048, 16, 16, 4, 7168, overrides)


def cwm_8b(**overrides: Any) -> ModelConfig:
  """An 8B-class CWM-shaped model (Llama-3-8B's widths, CWM's window pattern): the size
  one GPU trains with bf16 state and remat."""
  return _cwm_shaped(4096, 32, 32, 8, 14336, overrides)


def tiny(**overrides: Any) -> ModelConfig:
  """A CPU-sized CWM: 4 layers (global, local, local, global), window 16."""
  n_layers = overrides.pop("n_layers", 4)
  local = overrides.pop("local_window", 16)
  glob = overrides.pop("global_window", 4096)
  cfg = dict(
    vocab_size=512,
    dim=64,
    n_layers=n_layers,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    global_window=glob,
    layer_windows=meta_layer_windows(n_layers, local, glob),
    rope_scaling=RopeScaling(factor=4.0, original_context=64),
    max_seq_len=glob,
  )
  cfg.update(overrides)
  return ModelConfig(**cfg)


PRESETS = {"cwm_32b": cwm_32b, "cwm_8b": cwm_8b, "cwm_1b": cwm_1b, "tiny": tiny}


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
