"""Entry script of the sandbox's child process: `python -s [-S] child.py SOCKET_FD RECORD_FD`.

Reads the request (4-byte length + marshal) from the caller's socket: the run's parameters and
the compiled code of supervisor.py, worker.py, channel_writer.py and tracer.py (compiled once by the
caller, so no start pays for compiling them), then hands over to supervisor.py. With `--probe`
the request comes on stdin and the supervisor only checks what the kernel allows.
"""

import builtins
import marshal
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))


def read_request(fd):
  """The marshalled request behind a 4-byte big-endian length on `fd`; reads no byte past it
  (the caller's next message on the socket is the supervisor's)."""
  size = int.from_bytes(_read_exactly(fd, 4), "big")
  return marshal.loads(_read_exactly(fd, size))


def _read_exactly(fd, size):
  data = b""
  while len(data) < size:
    chunk = os.read(fd, min(size - len(data), 1 << 20))
    if not chunk:
      raise SystemExit("the caller closed the sandbox channel mid-request")
    data += chunk
  return data


def loader(codes):
  """load(name): a fresh module run from the caller-compiled code `codes[name]`, with a private
  copy of the builtins taken now: a program that replaces `builtins.repr`, `len` or `isinstance`
  later changes nothing the sandbox's own code computes."""

  def load(name):
    module = types.ModuleType("_cwm_" + name)
    module.__file__ = os.path.join(_HERE, name + ".py")
    module.__dict__["__builtins__"] = dict(builtins.__dict__)
    exec(codes[name], module.__dict__)  # pylint: disable=exec-used
    return module

  return load


if __name__ == "__main__":
  if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    del sys.path[0]  # the program must not import the sandbox's own modules by name
  probing = sys.argv[1:] == ["--probe"]
  request = read_request(0 if probing else int(sys.argv[1]))
  load = loader(request.pop("modules"))
  if probing:
    load("supervisor").probe(request)
  else:
    load("supervisor").supervise(request, int(sys.argv[1]), int(sys.argv[2]), load)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # no interpreter teardown: the caller is waiting for this exit
