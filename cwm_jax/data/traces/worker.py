"""The sandbox's worker process: block the network, then run, trace or test the program.

Stdlib only, loaded by child.py (before the uid drop) and run in the forked worker as
`main(request, record_fd, load)`, with the scratch directory as working directory. Modes:
  run    program.py runs as `__main__`; its exit code is the run's (no records);
  trace  the program's top level runs untraced, then `function(*args, **kwargs)` is recorded
         by tracer.py; one record {'status', 'frames', 'message'} goes to the caller;
  test   the program runs as `__main__`, then the items the caller's test plan needs
         (harness.py), one by one, in a namespace whose builtins are the pristine ones:
         ['exec', statement] runs an import or assignment, ['value', k, expression] evaluates
         a value of the program and returns its repr (a builtin value); one record
         {'status': 'ok', 'results', 'message'}. No verdict is decided here: the caller holds
         the expected values and evaluates every assert on the values read back.
Everything the worker needs (json, os.write, settrace, exec) is bound before the program runs.
"""

import builtins
import os
import sys
import types

_settrace, _setprofile, _exec, _eval, _exit = sys.settrace, sys.setprofile, exec, eval, os._exit


class NetworkDisabled(PermissionError):
  """Raised by every attempt to create or use a socket in the sandbox."""


def _deny_sockets(event, args):
  if event.startswith("socket."):
    raise NetworkDisabled("network access is disabled in the sandbox (%s)" % event)


def block_network(patch_module=True):
  """Makes socket creation, lookup or connection raise NetworkDisabled: an audit hook, and with
  `patch_module` replaced `socket` names (errors before any C code runs). In-process code can
  get around both; the network namespace, where there is one, is what actually isolates."""
  sys.addaudithook(_deny_sockets)
  if not patch_module:
    return
  import _socket
  import socket

  def refuse(*args, **kwargs):
    raise NetworkDisabled("network access is disabled in the sandbox")

  class BlockedSocket(socket.socket):
    def __init__(self, *args, **kwargs):
      refuse()

  for module in (socket, _socket):
    for name in ("socket", "SocketType"):
      setattr(module, name, BlockedSocket)
    for name in (
      "socketpair",
      "fromfd",
      "create_connection",
      "create_server",
      "getaddrinfo",
      "gethostbyname",
      "gethostbyname_ex",
      "gethostbyaddr",
    ):
      if hasattr(module, name):
        setattr(module, name, refuse)


def _tail(exc):
  """'Type: message', as the last line of a traceback (without importing traceback)."""
  kind = type(exc)
  name = kind.__qualname__
  if kind.__module__ not in ("builtins", "__main__"):
    name = "%s.%s" % (kind.__module__, name)
  try:
    text = str(exc)
  except Exception:  # pylint: disable=broad-except
    text = "<exception str() failed>"
  return "%s: %s" % (name, text) if text else name


def _main_module(path):
  with open(path, encoding="utf-8") as f:
    source = f.read()
  module = types.ModuleType("__main__")
  module.__file__ = path
  # The shared builtins module, as in `python program.py`: left unset, exec would hand the
  # program this module's private copy of the builtins (child.loader).
  module.__builtins__ = builtins
  sys.modules["__main__"] = module
  return module, source


def _finalize():
  """What the interpreter does at exit before its teardown: join non-daemon threads, run
  atexit handlers (the worker then leaves with os._exit)."""
  threading = sys.modules.get("threading")
  if threading is not None:
    threading._shutdown()  # pylint: disable=protected-access
  import atexit  # pylint: disable=g-import-not-at-top

  atexit._run_exitfuncs()  # pylint: disable=protected-access


def run(request, writer, tracer=None, finalize=True):
  """program.py as `__main__`, ending as `python program.py` would (unless not `finalize`)."""
  path = os.path.abspath("program.py")
  sys.argv = [path]
  module, source = _main_module(path)
  try:
    _exec(compile(source, path, "exec"), module.__dict__)
  except SystemExit:
    if finalize:
      _finalize()
    raise
  except BaseException as e:
    # Only on failure: importing traceback up front would slow the start of every run.
    import traceback  # pylint: disable=g-import-not-at-top

    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.stderr.flush()
    if finalize:
      _finalize()
    sys.exit(1)
  if finalize:
    _finalize()


def trace(request, writer, tracer):
  path = os.path.abspath("program.py")
  try:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    module = types.ModuleType("program")
    module.__file__ = path
    module.__builtins__ = builtins  # not this module's private copy (see _main_module)
    sys.modules["program"] = module
    _exec(compile(source, path, "exec"), module.__dict__)
    function = module
    for part in request["function"].split("."):
      function = getattr(function, part)
    args, kwargs = request["args"], request["kwargs"]
  except BaseException as e:  # the program's top level may raise anything, even SystemExit
    return writer.send(
      {"status": "error", "frames": [], "message": "loading the program failed: " + _tail(e)}
    )

  def abort(e):
    _settrace(None)
    writer.send({"status": e.status, "frames": [], "message": e.message})
    _exit(0)

  recorder = tracer.Recorder(
    path,
    source,
    max_events=request["max_events"],
    max_bytes=request["max_bytes"],
    max_value_chars=request["max_value_chars"],
    abort=abort,
    settrace=_settrace,
  )
  message = ""
  try:
    recorder.run(function, args, kwargs)
  except MemoryError:
    return writer.send(
      {"status": "memory", "frames": [], "message": "the traced call ran out of memory"}
    )
  except BaseException as e:  # the trace shows it; the run itself succeeded
    message = "raised " + _tail(e)
  writer.send({"status": "ok", "frames": recorder.frames, "message": message})


def _plain(x, depth=0):
  """Whether `x` holds only builtin values of exact builtin types (no user __eq__ anywhere)."""
  kinds = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)
  if type(x) not in kinds or depth > 100:
    return False
  if type(x) is dict:
    return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in x.items())
  if type(x) in (tuple, list, set, frozenset):
    return all(_plain(v, depth + 1) for v in x)
  return True


def _value_text(value):
  if not _plain(value):
    return None
  try:
    return repr(value)
  except ValueError:  # an int with more digits than repr allows
    return None


def test(request, writer, tracer=None):
  """Runs the program, then each item: ['exec', statement] or ['value', k, expression] (its
  value bound to `__cwm_vK__` for later items). Sends one record whose results hold, per item,
  ['v', repr of the value ('' for a statement)] or ['x', the exception]. The caller decides
  every verdict on these values (harness.py): nothing here is trusted."""
  items = [
    (
      item[0],
      item[1] if item[0] == "value" else None,
      _compile(item[-1], "eval" if item[0] == "value" else "exec"),
    )
    for item in request["tests"]
  ]
  pristine = dict(builtins.__dict__)
  try:
    run(request, writer, finalize=False)
  except BaseException as e:  # exit(), sys.exit(0), os._exit(...) before the tests: no values
    return writer.send(
      {
        "status": "ok",
        "results": [],
        "message": "the program stopped before the tests: " + _tail(e),
      }
    )
  _settrace(None)
  _setprofile(None)
  builtins.__dict__.clear()
  builtins.__dict__.update(pristine)
  namespace = {
    k: v
    for k, v in sys.modules["__main__"].__dict__.items()
    if k not in pristine and not k.startswith("__")
  }
  namespace["__name__"] = "__tests__"
  results = []
  for kind, k, code in items:
    namespace["__builtins__"] = dict(pristine)
    try:
      if kind == "value":
        value = _eval(code, namespace)
        namespace["__cwm_v%d__" % k] = value
        text = _value_text(value)
        results.append(
          ["v", text]
          if text is not None
          else ["x", "not a builtin value: %s" % type(value).__name__]
        )
      else:
        _exec(code, namespace)
        results.append(["v", ""])
    except MemoryError:
      raise  # the run's 'memory' status, not a failed test
    except BaseException as e:
      results.append(["x", _tail(e)[:500]])
  writer.send({"status": "ok", "results": results, "message": ""})
  for stream in (sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except BaseException:  # pylint: disable=broad-except
      pass
  _exit(0)  # no atexit handler of the program runs after the record


def _compile(text, mode):
  return compile(text, "<tests>", mode, dont_inherit=True)


def main(request, record_fd, load):
  writer = None
  if request["mode"] != "run":  # before the program: it may replace json, os.write, ...
    writer = load("channel_writer").Writer(record_fd, bytes.fromhex(request["nonce"]))
  if not os.path.exists(sys.executable):  # a virtualenv's link, outside the minimal root
    sys.executable = request["executable"]
  if not hasattr(builtins, "exit"):  # `python -S` skips site, which defines these
    builtins.exit = builtins.quit = sys.exit
  tracer = load("tracer") if request["mode"] == "trace" else None
  block_network(patch_module=not request["namespaces"])
  {"run": run, "trace": trace, "test": test}[request["mode"]](request, writer, tracer)
