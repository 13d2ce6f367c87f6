"""cwm_jax.base: the one strict-fields check, and the sections that use it word their errors
alike (the unknown names, then the known ones)."""

import re

import pytest

from cwm_jax.base import ConfigError, check_fields, unknown_fields
from cwm_jax.checkpoint import hf
from cwm_jax.data import corpus_build, pipeline
from cwm_jax.infer import evaluation
from cwm_jax.parallel import mesh as mesh_lib


def test_unknown_fields_names_the_unknown_and_the_known():
  assert unknown_fields({"a": 1, "b": 2}, ("a", "b", "c"), "section") == ""
  assert unknown_fields([], ("a",)) == ""
  assert (
    unknown_fields(["z", "a", "y"], ("b", "a"), "data config")
    == "data config: unknown fields ['y', 'z']; known: ['a', 'b']"
  )
  assert (
    unknown_fields(["x"], ["k"], what="eval config keys", fix="see the docs")
    == "unknown eval config keys ['x']; known: ['k']; see the docs"
  )


def test_check_fields_raises_the_error_asked_for():
  check_fields({"a": 1}, ("a",))  # nothing unknown: no error
  with pytest.raises(ConfigError, match=r"^s: unknown fields \['b'\]; known: \['a'\]$"):
    check_fields({"a": 1, "b": 2}, ("a",), "s")
  with pytest.raises(ValueError, match="unknown fields") as e:
    check_fields(["b"], ("a",), error=ValueError)
  assert type(e.value) is ValueError


_HF_SIZES = dict(
  num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=16, vocab_size=32
)


@pytest.mark.parametrize(
  "check, lead",
  [
    (lambda: pipeline.DataConfig.from_config({"mixture": [], "bogus": 1}), "data config: "),
    (lambda: mesh_lib.mesh_shape({"data": 1, "bogus": 2}, 2), "mesh: "),
    (lambda: evaluation.EvalConfig.from_mapping({"bogus": 1}), ""),
    (
      lambda: corpus_build.corpus_entries([{"kind": "corpus", "name": "code", "bogus": 1}]),
      "data.mixture entry ",
    ),
    (
      lambda: hf.config_from_hf(dict(_HF_SIZES, layer_types=["bogus"])),
      "config.json layer_types: ",
    ),
  ],
)
def test_sections_word_unknown_fields_alike(check, lead):
  with pytest.raises(ConfigError) as e:
    check()
  message = str(e.value)
  assert message.startswith(lead), message
  assert re.search(r"unknown [a-z ]+ \['bogus'\]; known: \['", message), message
