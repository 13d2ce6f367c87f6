"""Embedded corpora: records, the build CLI, ArrayRecord/TFDS round trips."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from absl import app, flags

from cwm_jax.data import bpe, build, corpora, corpus_build, formats, pipeline, traces
from cwm_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def traced():
  return list(corpora.traced_calls(limit=2))


def _read_array_record(folder):
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".array_record"))
  source = grain.sources.ArrayRecordDataSource(files)
  return [json.loads(source[i]) for i in range(len(source))]


def test_code_corpus_is_the_stdlib_sources(tmp_path):
  out = tmp_path / "code"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "cwm_jax.data.build",
      "--corpus=code",
      f"--out={out}",
      "--limit=4",
      "--shards=2",
    ],
    env=env,
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(run.stdout.strip().splitlines()[-1])["records"] == 4
  records = _read_array_record(out)
  files = bpe.stdlib_files()[:4]
  expected = set()
  for path in files:
    with open(path, encoding="utf-8") as f:
      expected.add(f.read())
  assert {r["text"] for r in records} == expected
  assert all(r["format"] == "text" for r in records)
  flags.FLAGS(["build", "--corpus=poems", f"--out={out}"])
  with pytest.raises(app.UsageError, match="choose one of") as e:
    build.main(["build"])
  assert e.value.exitcode == 2


def test_trace_records_are_cwm_trace_documents(traced):
  tok = Tokenizer.default()
  assert len(traced) == 2
  for t in traced:
    record = {"format": "trace", "text": formats.trace_document(t["prompt"], t["frames_text"])}
    assert record["text"] == traces.format_trace(t["source"], t["function"], t["frames"])
    ids, weights = formats.example_from_record(tok, record)
    marked = t["prompt"][len("<|begin_of_text|><|trace_context_start|>") : -len("<|frame_sep|>")]
    assert "# << START_OF_TRACE" in marked
    prompt_ids = tok.trace_prompt(marked)
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert ids[-1] == tok.eos_id and weights.min() == 1.0
    events = [tok.special_id(f"<|{e}_sep|>") for e in ("call", "line", "return", "exception")]
    n_frames = int(np.isin(ids, events).sum())
    assert n_frames == len(t["frames"]) == len(traces.parse_frames(record["text"]))


def test_sft_dialogs_weigh_only_the_assistant(traced):
  tok = Tokenizer.default()
  dialogs = corpora.sft_dialogs(traced[0])
  assert len(dialogs) == 2
  for dialog in dialogs:
    ids, weights = formats.example_from_record(tok, dialog)
    user, assistant = dialog["messages"]
    content = assistant["content"]
    layout = (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
      + user["content"]
      + "<|eot_id|>"
      + "<|start_header_id|>assistant<|end_header_id|>\n\n"
      + "<|reasoning_thinking_start|>"
      + assistant["reasoning"]
      + "<|reasoning_thinking_end|>"
      + content
      + "<|eot_id|>"
    )
    assert tok.decode(ids) == layout
    first = int(np.argmax(weights > 0))
    assert (weights[first:] == 1).all() and not weights[:first].any()
    assert tok.decode(ids[first:]).startswith("<|reasoning_thinking_start|>")
    if assistant.get("trace"):
      assert (
        traces.parse_frames(content) and tok.special_id("<|frame_sep|>") in ids[first:].tolist()
      )
    else:
      assert not any(tok.is_special(i) for i in tok.encode(user["content"] + content))


def test_tfds_writer_feeds_the_pipeline(tmp_path):
  manifest = corpus_build.build_corpus("code", str(tmp_path), limit=2, writer="tfds")
  assert manifest["records"] == 2
  cfg = pipeline.default_data_config().to_dict()
  cfg.update(
    mixture=[{"kind": "tfds", "path": manifest["path"]}],
    num_epochs=1,
    shuffle=False,
    read_threads=1,
  )
  tok = Tokenizer.default()
  expected = sorted(tok.encode(r["text"], bos=True, eos=True) for r in corpora.code_records(2))
  it = pipeline.make_iterator(cfg, seq_len=max(map(len, expected)), global_batch=2)
  docs = []
  for batch in it:
    for b in range(2):
      seg = batch["segment_ids"][b]
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)
        docs.append(batch["inputs"][b, idx].tolist() + [int(batch["targets"][b, idx[-1]])])
  assert sorted(docs) == expected


def test_training_corpora_skip_the_held_out_programs():
  from cwm_jax.data.traces.examples import is_held_out, program_calls

  calls = program_calls()
  held = {os.path.basename(c.origin) for c in calls if is_held_out(c.origin)}
  assert held and len(held) < len({os.path.basename(c.origin) for c in calls})
  used = {
    os.path.basename(c.origin) for c in corpora._calls(limit=None) if c.origin.endswith(".py")
  }
  assert used and not used & held


def test_build_refuses_a_non_empty_folder_that_is_not_a_corpus(tmp_path):
  from cwm_jax.base import ConfigError

  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not an empty folder or a corpus"):
    corpus_build.build_corpus("code", str(tmp_path), limit=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
