"""Child side of the sandbox: block the network, then run or trace a program.

Started by sandbox.py as `python -s child.py request.json AS,CPU,FSIZE` inside
a scratch directory; it applies those resource limits before anything else. Stdlib only: the package is
not importable here. The request (JSON) holds 'mode' ('run' or 'trace'),
'program' (a file in the scratch directory) and, for 'trace', 'function',
'args' / 'kwargs' (Python literals), the recorder limits and 'result' (the
file that receives {'status', 'frames', 'message'}).
"""

import ast
import builtins
import importlib.util
import json
import os
import sys
import traceback
import types

_HERE = os.path.dirname(os.path.abspath(__file__))


class NetworkDisabled(PermissionError):
  """Raised by every attempt to create or use a socket in the sandbox."""


def _deny_sockets(event, args):
  if event.startswith('socket.'):
    raise NetworkDisabled('network access is disabled in the sandbox (%s)' % event)


def block_network():
  """Makes any socket creation, lookup or connection raise NetworkDisabled.

  The audit hook cannot be removed by the program; the replaced module
  attributes give a clear error before any C code runs.
  """
  import _socket
  import socket

  def refuse(*args, **kwargs):
    raise NetworkDisabled('network access is disabled in the sandbox')

  class BlockedSocket(socket.socket):

    def __init__(self, *args, **kwargs):
      refuse()

  for module in (socket, _socket):
    for name in ('socket', 'SocketType'):
      setattr(module, name, BlockedSocket)
    for name in ('socketpair', 'fromfd', 'create_connection', 'create_server', 'getaddrinfo',
                 'gethostbyname', 'gethostbyname_ex', 'gethostbyaddr'):
      if hasattr(module, name):
        setattr(module, name, refuse)
  sys.addaudithook(_deny_sockets)


def _load_program(path):
  with open(path, encoding='utf-8') as f:
    source = f.read()
  module = types.ModuleType('program')
  module.__file__ = path
  sys.modules['program'] = module
  exec(compile(source, path, 'exec'), module.__dict__)
  return module, source


def _write(path, status, frames=(), message=''):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'status': status, 'frames': list(frames), 'message': message}, f)


def _tail(exc):
  return ''.join(traceback.format_exception_only(type(exc), exc)).strip()


def trace(request):
  spec = importlib.util.spec_from_file_location('_cwm_tracer', os.path.join(_HERE, 'tracer.py'))
  tracer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tracer)
  path, result = os.path.abspath(request['program']), request['result']
  try:
    module, source = _load_program(path)
    function = module
    for part in request['function'].split('.'):
      function = getattr(function, part)
    args, kwargs = ast.literal_eval(request['args']), ast.literal_eval(request['kwargs'])
  except BaseException as e:  # the program's top level may raise anything, even SystemExit
    return _write(result, 'error', message='loading the program failed: ' + _tail(e))

  def abort(e):
    sys.settrace(None)
    _write(result, e.status, message=e.message)
    os._exit(0)

  recorder = tracer.Recorder(path, source, max_events=request['max_events'],
                             max_bytes=request['max_bytes'],
                             max_value_chars=request['max_value_chars'], abort=abort)
  try:
    recorder.run(function, args, kwargs)
  except MemoryError:
    return _write(result, 'memory', message='the traced call ran out of memory')
  except BaseException as e:  # the trace shows it; the run itself succeeded
    return _write(result, 'ok', recorder.frames, 'raised ' + _tail(e))
  _write(result, 'ok', recorder.frames)


def run(request):
  path = os.path.abspath(request['program'])
  sys.argv = [path]
  with open(path, encoding='utf-8') as f:
    code = compile(f.read(), path, 'exec')
  main = types.ModuleType('__main__')
  main.__file__ = path
  sys.modules['__main__'] = main
  try:
    exec(code, main.__dict__)
  except SystemExit:
    raise
  except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.stderr.flush()
    sys.exit(1)


def apply_limits(spec):
  """Applies 'AS,CPU,FSIZE' resource limits (bytes, seconds, bytes) to this process.

  Done here, first thing, rather than in a `preexec_fn`: the parent may be a
  multithreaded JAX process, where fork-then-run-Python is unsafe.
  """
  import resource
  memory, cpu, fsize = (int(v) for v in spec.split(','))
  resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main():
  apply_limits(sys.argv[2])
  if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    del sys.path[0]  # the program must not import the sandbox's own modules
  with open(sys.argv[1], encoding='utf-8') as f:
    request = json.load(f)
  os.remove(sys.argv[1])
  if not hasattr(builtins, 'exit'):  # `python -S` skips site, which defines these
    builtins.exit = builtins.quit = sys.exit
  if request.get('block_network', True):
    block_network()
  if request['mode'] == 'trace':
    trace(request)
  else:
    run(request)


if __name__ == '__main__':
  main()
