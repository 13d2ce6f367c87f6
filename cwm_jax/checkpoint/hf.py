"""Hugging Face CWM checkpoints: config.json <-> ModelConfig, safetensors read and streamed write.

A checkpoint directory may be local or a URL (`gs://...`): files are read through
`cwm_jax.storage`, a safetensors file of a URL from its local cached copy
(`storage.local_copy`), since safetensors maps a local file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from cwm_jax import storage
from cwm_jax.base import ConfigError, check_fields
from cwm_jax.model.config import ModelConfig, RopeScaling

FULL, SLIDING = "full_attention", "sliding_attention"


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from a config.json dict; `layer_types` is copied verbatim."""
  if not isinstance(hf, dict):
    raise ConfigError("config.json must hold a JSON object")
  missing = [
    k
    for k in (
      "num_hidden_layers",
      "num_attention_heads",
      "hidden_size",
      "intermediate_size",
      "vocab_size",
    )
    if not isinstance(hf.get(k), int)
  ]
  if missing:
    raise ConfigError(f"config.json lacks integer fields {missing}; is this a CWM config.json?")
  n_layers = hf["num_hidden_layers"]
  global_window = int(hf.get("max_position_embeddings", 131072))
  sliding = hf.get("sliding_window") or global_window
  types = hf.get("layer_types") or [FULL if i % 4 == 0 else SLIDING for i in range(n_layers)]
  check_fields(types, (FULL, SLIDING), "config.json layer_types", "kinds")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e6)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("llama3", "default"):
    raise ConfigError(f"unsupported rope_type {kind!r}; CWM uses 'llama3'")
  scaling = None
  if kind == "llama3":
    scaling = RopeScaling(
      factor=float(rope["factor"]),
      low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_context=int(rope["original_max_position_embeddings"]),
    )
  n_heads = hf["num_attention_heads"]
  fields = dict(
    vocab_size=hf["vocab_size"],
    dim=hf["hidden_size"],
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=hf.get("num_key_value_heads") or n_heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
    ffn_dim=hf["intermediate_size"],
    global_window=global_window,
    layer_windows=tuple(global_window if t == FULL else int(sliding) for t in types),
    norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    rope_theta=theta,
    rope_scaling=scaling,
    max_seq_len=global_window,
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16", **token_ids: Any) -> dict[str, Any]:
  """config.json dict for `CwmForCausalLM`, with the explicit per-layer pattern."""
  local = sorted({w for w in cfg.layer_windows if w < cfg.global_window})
  if len(local) > 1:
    raise ConfigError(f"Hugging Face CWM has one sliding_window; this model has {local}")
  rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope.update(
      rope_type="llama3",
      factor=s.factor,
      low_freq_factor=s.low_freq_factor,
      high_freq_factor=s.high_freq_factor,
      original_max_position_embeddings=s.original_context,
    )
  out = {
    "architectures": ["CwmForCausalLM"],
    "model_type": "cwm",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.dim,
    "intermediate_size": cfg.ffn_dim,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "max_position_embeddings": cfg.global_window,
    "sliding_window": local[0] if local else cfg.global_window,
    "layer_types": [FULL if w >= cfg.global_window else SLIDING for w in cfg.layer_windows],
    "rope_parameters": rope,
    "tie_word_embeddings": False,
    "dtype": dtype,
  }
  out.update(fitting_token_ids(token_ids, cfg.vocab_size))
  return out


def fitting_token_ids(token_ids: dict[str, Any], vocab_size: int) -> dict[str, Any]:
  """The special-token ids (bos/eos/pad; eos may be a list) inside [0, vocab_size);
  an entry with no fitting id is left out."""
  out: dict[str, Any] = {}
  for key, value in token_ids.items():
    if isinstance(value, (list, tuple)):
      kept = [int(v) for v in value if 0 <= int(v) < vocab_size]
      if kept:
        out[key] = kept
    elif value is not None and 0 <= int(value) < vocab_size:
      out[key] = int(value)
  return out


ST_DTYPES = {
  "F32": np.dtype("float32"),
  "F16": np.dtype("float16"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F64": np.dtype("float64"),
}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "generation_config.json",
  "chat_template.jinja",
)


def _bad(path: str, what: str) -> ConfigError:
  return ConfigError(f"safetensors file {path} is corrupt: {what}; re-download or re-convert it")


def _read_header(path: str) -> dict[str, Any]:
  """The JSON header of a safetensors file (local or URL; no tensor data is read),
  checked against the file's size: a truncated, empty or garbage file is a ConfigError
  naming it."""
  try:
    with storage.open_file(path, "rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(0)
      if size < 8:
        raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
      (n,) = struct.unpack("<Q", f.read(8))
      if n > size - 8 or n > 100 * 2**20:
        raise _bad(path, f"header length {n} exceeds the file's {size} bytes")
      header = json.loads(f.read(n))
  except ConfigError:
    raise
  except FileNotFoundError:
    raise ConfigError(f"safetensors file {path} is missing; re-download the checkpoint") from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise _bad(path, f"unreadable header ({e})") from None
  if not isinstance(header, dict):
    raise _bad(path, "the header is not a JSON object")
  header.pop("__metadata__", None)
  data = size - 8 - n
  for name, info in header.items():
    try:
      begin, end = info["data_offsets"]
      nbytes = math.prod(info["shape"]) * ST_DTYPES[info["dtype"]].itemsize
    except (TypeError, KeyError, ValueError):
      raise _bad(path, f"tensor {name!r} has an invalid header entry {info!r}") from None
    if not 0 <= begin <= end <= data or end - begin != nbytes:
      raise _bad(
        path,
        f"tensor {name!r} spans bytes [{begin}, {end}) of {data} data bytes "
        f"(needs {nbytes}): the file is truncated or damaged",
      )
  return header


def read_json(path: str, what: str) -> Any:
  """A checkpoint's JSON file; missing or unparsable is a ConfigError naming it."""
  try:
    return storage.read_json(path)
  except FileNotFoundError:
    raise ConfigError(f"{what} {path} is missing") from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ConfigError(f"{what} {path} is not valid JSON ({e}); restore the file") from None


class SafetensorsReader:
  """Lazy access to the tensors of one or many safetensors files."""

  def __init__(self, directory: str):
    index = storage.join(directory, "model.safetensors.index.json")
    if storage.exists(index):
      data = read_json(index, "safetensors index")
      weight_map = data.get("weight_map") if isinstance(data, dict) else None
      if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v for v in weight_map.values()
      ):
        raise ConfigError(f"{index} has no valid weight_map {{tensor: file name}}; restore it")
    else:
      files = [p for p in storage.listdir(directory) if p.endswith(".safetensors")]
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
      weight_map = {
        k: fname for fname in files for k in _read_header(storage.join(directory, fname))
      }
    self.directory, self.weight_map = directory, weight_map
    self._headers: dict[str, dict] = {}

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def _info(self, name: str) -> dict:
    fname = self.weight_map[name]
    if fname not in self._headers:
      self._headers[fname] = _read_header(storage.join(self.directory, fname))
    if name not in self._headers[fname]:
      raise ConfigError(f"{self.directory}: the index puts {name!r} in {fname}, which lacks it")
    return self._headers[fname][name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info(name)["shape"])

  def dtype(self, name: str) -> np.dtype:
    code = self._info(name)["dtype"]
    if code not in ST_DTYPES:
      raise ConfigError(f"{name} has dtype {code}; expected one of {sorted(ST_DTYPES)}")
    return ST_DTYPES[code]

  def get(self, name: str) -> np.ndarray:
    """One tensor as numpy; bfloat16 arrives as ml_dtypes.bfloat16."""
    path = storage.join(self.directory, self.weight_map[name])
    self._info(name)  # header checked against the file size first
    try:
      with safe_open(storage.local_copy(path), framework="numpy") as f:
        return f.get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except  (safetensors' own error types)
      raise _bad(path, f"reading {name} failed ({e})") from None


def plan_shards(
  specs: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Greedy split of (name, shape, dtype) into shards of at most max_shard_bytes
  (a tensor larger than the limit gets a shard of its own)."""
  shards, size = [[]], 0
  for spec in specs:
    nbytes = math.prod(spec[1]) * spec[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


def write_safetensors(
  directory: str, specs, fetch: Callable[[str], np.ndarray], max_shard_bytes: int = 5 * 10**9
) -> dict[str, str]:
  """Streams tensors into sharded safetensors files plus the index.

  The header of each shard is written first from `specs` (name, shape, dtype),
  then tensors are fetched and appended one at a time. Returns the weight map.
  """
  code = {v: k for k, v in ST_DTYPES.items()}
  shards = plan_shards(list(specs), max_shard_bytes)
  weight_map, total = {}, 0
  for n, shard in enumerate(shards):
    fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in shard:
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {
        "dtype": code[dtype],
        "shape": list(shape),
        "data_offsets": [offset, offset + nbytes],
      }
      offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with storage.open_file(storage.join(directory, fname), "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob)
      for name, shape, dtype in shard:
        value = fetch(name)
        if value.shape != tuple(shape) or value.dtype != dtype:
          raise ValueError(
            f"{name}: produced {value.shape} {value.dtype}, planned {tuple(shape)} {dtype}"
          )
        f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        weight_map[name] = fname
    total += offset
  storage.write_json(
    storage.join(directory, "model.safetensors.index.json"),
    {"metadata": {"total_size": total}, "weight_map": weight_map},
    indent=2,
  )
  return weight_map
