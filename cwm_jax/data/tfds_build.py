"""The embedded corpora as a tensorflow-datasets builder (`--writer tfds`).

A `GeneratorBasedBuilder` with `file_format='array_record'` and one feature, `record` (the JSON
text of a record); read it with a pipeline source of kind `tfds` and `path:` the printed builder
folder. tensorflow_datasets is heavy, so it is imported (and the builder class defined, once)
only when this writer is used.
"""

import functools
import json

from cwm_jax import storage
from cwm_jax.base import require_extra
from cwm_jax.data import corpora


@functools.cache
def _builder_class():
  """(CorpusConfig, CwmCorpus), defined on first use (tfds registers builders by name)."""
  tfds = require_extra("tensorflow_datasets", "data", "the tfds writer (--writer tfds)")

  class CorpusConfig(tfds.core.BuilderConfig):
    """Which corpus and how many files/calls (None: all)."""

    def __init__(self, *, corpus: str, limit: int | None = None):
      name = corpus if limit is None else f"{corpus}_limit{limit}"
      super().__init__(name=name)
      self.corpus, self.limit = corpus, limit

  class CwmCorpus(tfds.core.GeneratorBasedBuilder):
    """The cwm_jax embedded corpora as a TFDS dataset (one `train` split)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [CorpusConfig(corpus=n) for n in corpora.CORPORA]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      # Nothing is downloaded, so there is no checksums file next to the code; tfds's lookup
      # of this path needs `importlib_resources` for editable installs, which is not installed.
      return None

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description="cwm_jax corpus; `record` is a JSON document, see cwm_jax.data.formats.",
        features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      records = corpora.corpus_records(self.builder_config.corpus, self.builder_config.limit)
      for i, record in enumerate(records):
        yield i, {"record": json.dumps(record, ensure_ascii=False)}

  return CorpusConfig, CwmCorpus


def write_tfds(corpus: str, out: str, limit: int | None) -> dict:
  """Prepares corpus `corpus` as a TFDS builder under local folder `out` (its array_record
  writer writes local files; `corpus_build` stages a URL's corpus and publishes it)."""
  if storage.is_url(out):
    raise ValueError(
      f"write_tfds writes local files, not {out!r}: stage the corpus with "
      "storage.publish_dir (as corpus_build does)"
    )
  corpus_config, builder_class = _builder_class()
  config = corpus if limit is None else corpus_config(corpus=corpus, limit=limit)
  builder = builder_class(config=config, data_dir=out, file_format="array_record")
  builder.download_and_prepare()
  return {
    "corpus": corpus,
    "writer": "tfds",
    "path": str(builder.data_dir),
    "records": builder.info.splits["train"].num_examples,
  }
