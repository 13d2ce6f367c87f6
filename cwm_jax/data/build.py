"""Builds a corpus as ArrayRecord shards plus manifest.json (the library is `corpus_build`).

  python -m cwm_jax.data.build --corpus code --out /tmp/cwm_data/code
  python -m cwm_jax.data.build --corpus code --out gs://BUCKET/data/code
  python -m cwm_jax.data.build --corpus traces --out DIR --limit 50
  python -m cwm_jax.data.build --corpus sft --out DIR --writer tfds
  python -m cwm_jax.data.build --corpus functions --out DIR --functions calls.jsonl --workers 2
  python -m cwm_jax.data.build --corpus repo_traces --out DIR --stdlib_tests test_bisect,test_heapq
  python -m cwm_jax.data.build --corpus repo_traces --out DIR --repo ~/src/project
  python -m cwm_jax.data.build --corpus repo_traces --out DIR --runner DataflowRunner \\
      -- --project=P --region=R --temp_location=gs://B/tmp

--out, --functions and --eval_set may be local paths or gs:// URLs (`cwm_jax.storage`); a corpus
is complete once its manifest.json exists, which is written last. Every record is one UTF-8 JSON
object in the schema of `cwm_jax.data.formats`. Trace corpora
print progress on stderr; their manifest counts drops by reason, duplicates and contaminated
records. Trace corpora are built by a Beam pipeline: the default `--runner DirectRunner` runs it
locally in `--workers` processes; arguments after `--` are Beam pipeline options for any runner
(DataflowRunner, FlinkRunner, SparkRunner). Bad flags exit with status 2.
"""

import json

from absl import app, flags

from cwm_jax import cli
from cwm_jax.base import ConfigError
from cwm_jax.data import corpus_build, repo_traces, traces

_CORPUS = flags.DEFINE_string("corpus", None, f"One of {corpus_build.CORPORA}.")
_OUT = flags.DEFINE_string(
  "out",
  None,
  "Output folder: a local path or a gs:// URL, new, empty or an earlier corpus (replaced).",
)
_LIMIT = flags.DEFINE_integer(
  "limit", None, "At most this many source files / traced calls / test modules (repo_traces)."
)
_SHARDS = flags.DEFINE_integer("shards", 1, "ArrayRecord files to write.")
_WRITER = flags.DEFINE_string("writer", "array_record", f"One of {corpus_build.WRITERS}.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Items traced at once (trace corpora).")
_RUNNER = flags.DEFINE_string(
  "runner",
  "DirectRunner",
  "A Beam runner (default DirectRunner: "
  "local, --workers processes; DataflowRunner, FlinkRunner, ... with "
  "pipeline options after --), or 'local' (a thread pool, no Beam).",
)
_FUNCTIONS = flags.DEFINE_string(
  "functions",
  None,
  'JSONL of {"source" or "path", "function", "args", "kwargs"} (corpus functions).',
)
_DOCTESTS = flags.DEFINE_list(
  "doctest_modules",
  list(traces.DOCTEST_MODULES),
  "Modules whose literal doctest calls are traced (functions).",
)
_PROGRAMS = flags.DEFINE_bool(
  "programs", True, "Trace the shipped programs (held-out ones skipped) too (functions)."
)
_REPO = flags.DEFINE_string(
  "repo",
  None,
  "A Python project whose test suite is traced (repo_traces; its dependencies must be installed).",
)
_STDLIB_TESTS = flags.DEFINE_list(
  "stdlib_tests",
  list(repo_traces.STDLIB_EXAMPLE),
  "Standard-library test modules (repo_traces without --repo); 'all' for the whole suite.",
)
_EVAL = flags.DEFINE_list(
  "eval_set",
  [],
  "Evaluation programs to decontaminate against, "
  'besides the held-out ones: .py files, folders, JSONL with "source".',
)
_PER_TEST = flags.DEFINE_float("per_test_timeout_s", 20.0, "Wall-clock limit per test.")
_PER_TEST_TRACES = flags.DEFINE_integer("max_traces_per_test", 64, "Traced calls per test.")
_PER_FUNCTION = flags.DEFINE_integer(
  "max_traces_per_function", 32, "Traces of one function per test module."
)
_NGRAM = flags.DEFINE_integer("ngram", 13, "Decontamination n-gram length (code tokens).")
_THRESHOLD = flags.DEFINE_float(
  "contamination_threshold",
  0.1,
  "Share of an evaluation program's n-grams that makes a source contaminated.",
)


def _sources() -> dict:
  if _CORPUS.value == "functions":
    return {
      "functions_jsonl": _FUNCTIONS.value,
      "doctest_modules": _DOCTESTS.value,
      "programs": _PROGRAMS.value,
    }
  if _CORPUS.value == "repo_traces":
    stdlib = None if _STDLIB_TESTS.value == ["all"] else _STDLIB_TESTS.value
    return {"repo": _REPO.value, "stdlib_tests": stdlib}
  if _FUNCTIONS.value or _REPO.value:
    raise ConfigError("--functions and --repo apply to --corpus functions / repo_traces")
  return {}


def main(argv):
  if not _CORPUS.value or not _OUT.value:
    raise app.UsageError("--corpus and --out are required", exitcode=2)
  try:
    config = corpus_build.TraceBuildConfig(
      workers=_WORKERS.value,
      runner=_RUNNER.value,
      pipeline_args=tuple(argv[1:]),
      repo_limits=repo_traces.RepoLimits(
        per_test_timeout_s=_PER_TEST.value,
        max_traces_per_test=_PER_TEST_TRACES.value,
        max_traces_per_function=_PER_FUNCTION.value,
      ),
      eval_paths=tuple(_EVAL.value),
      ngram=_NGRAM.value,
      contamination_threshold=_THRESHOLD.value,
    )
    if len(argv) > 1 and (
      config.runner == "local" or _CORPUS.value not in corpus_build.TRACE_CORPORA
    ):
      raise ConfigError(
        f"unexpected arguments {argv[1:]}; Beam pipeline options need a Beam "
        f"--runner and a trace corpus ({', '.join(corpus_build.TRACE_CORPORA)})"
      )
    manifest = corpus_build.build_corpus(
      _CORPUS.value,
      _OUT.value,
      limit=_LIMIT.value,
      num_shards=_SHARDS.value,
      writer=_WRITER.value,
      config=config,
      **_sources(),
    )
  except (ConfigError, ValueError) as e:
    raise app.UsageError(str(e), exitcode=2) from e
  print(json.dumps(manifest))


def run():
  cli.run_main(main)


if __name__ == "__main__":
  run()
