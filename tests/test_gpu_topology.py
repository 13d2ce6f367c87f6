"""GPU targets for the planner: cluster names, target configs, compile-only CUDA devices.

The compile tests need the CUDA plugin (`jax[cuda12]` of the pinned version), not a
GPU; they skip, saying so, where it is not installed.
"""

import importlib.util
import os

import pytest

from cwm_jax.base import ConfigError
from cwm_jax.kernels import cudnn
from cwm_jax.recipe.stages import stage_configs
from cwm_jax.train import gpu_topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
NEEDS_PLUGIN = pytest.mark.skipif(
  not HAVE_PLUGIN,
  reason="the CUDA plugin is not installed (pip install "
  "'jax[cuda12]==<jax version>'); a GPU is not needed",
)


def test_cluster_names():
  one = gpu_topology.cluster_spec("h100x8")
  assert (one.gpu.name, one.hosts, one.per_host, one.size) == ("h100", 1, 8, 8)
  many = gpu_topology.cluster_spec("H200:4x8")
  assert (many.gpu.kind, many.size, many.name) == ("NVIDIA H200", 32, "h200:4x8")
  for bad in ("v5p-8", "h100", "h100:0x8", "b300x8", ""):
    with pytest.raises(ConfigError, match="h100:4x8"):
      gpu_topology.cluster_spec(bad)


def test_target_config_carries_the_public_figures():
  text = gpu_topology.GPUS["h100"].target_config()
  assert "core_count: 132" in text and "major: 9 minor: 0" in text
  assert f"device_memory_size: {int(79.6 * 2**30)}" in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "major: 8 minor: 0" in gpu_topology.GPUS["a100"].target_config()


def test_compiling_for_answers_for_the_target_and_restores():
  fmha = cudnn.cudnn_fmha
  before = fmha.check_compute_capability
  with cudnn.compiling_for("9.0"):
    assert fmha.check_compute_capability("9.0") and not fmha.check_compute_capability("10.0")
    assert fmha.is_cuda_compute_capability_equal("9.0")
  with cudnn.compiling_for("8.0"):
    assert not fmha.check_compute_capability("9.0")
  assert fmha.check_compute_capability is before


@pytest.mark.skipif(HAVE_PLUGIN, reason="the CUDA plugin is installed")
def test_missing_plugin_is_a_clear_error():
  with pytest.raises(ConfigError, match=r"pip install 'jax\[cuda12\]"):
    gpu_topology.devices(gpu_topology.cluster_spec("h100x2"))


def _smoke_config(stage):
  spec = importlib.util.spec_from_file_location(
    "smoke_config", os.path.join(ROOT, "configs/smoke.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"stage={stage}")


@NEEDS_PLUGIN
def test_smoke_stage_compiles_for_h100s_with_cudnn_attention():
  config = _smoke_config("midtrain")
  config.execution.attention_impl = "cudnn"
  config.execution.compute_dtype = "bfloat16"
  plan = gpu_topology.gpu_plan(stage_configs(config), "h100x2", mesh_text="data=2")
  plan = plan.get("stages", {}).get("midtrain", plan)
  assert plan["device_kind"] == "NVIDIA H100 80GB HBM3" and plan["devices"] == 2
  assert plan["fits"] and 0 < plan["total_gb_per_device"] < 1
  assert plan["attention_impl"] == "cudnn" and plan["gpus"] == "h100:1x2"
