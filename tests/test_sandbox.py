"""The code metric's sandbox against hostile programs: each escape that a plain subprocess allows is tried and
must fail. Skipped where the machine cannot build the namespace sandbox (the module then warns and runs code
with resource limits alone)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from esft_jax.evaluate import sandbox
from esft_jax.evaluate.sandbox import run_python

needs_namespaces = pytest.mark.skipif(sandbox.isolation() != "namespaces",
                                      reason=f"no namespace sandbox here: {sandbox._isolation_reason}")


def _processes_with(token: str) -> list[int]:
  """Ids of the live processes whose command line holds `token`."""
  found = []
  for entry in Path("/proc").iterdir():
    try:
      if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
        found.append(int(entry.name))
    except OSError:  # gone meanwhile
      pass
  return found


def _none_left(token: str, wait_s: float = 3.0) -> bool:
  deadline = time.monotonic() + wait_s
  while _processes_with(token):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


@needs_namespaces
def test_writes_outside_the_scratch_folder_fail():
  open_dir = Path(tempfile.mkdtemp(prefix="esft_sandbox_"))
  open_dir.chmod(0o777)  # only the read-only mount, not permissions, can stop the write
  try:
    program = (f"import os\n"
               f"open('mine.txt', 'w').write('scratch is writable')\n"
               f"for path in ({str(open_dir / 'escaped.txt')!r}, '/tmp/esft_escaped.txt'):\n"
               f"  try:\n"
               f"    open(path, 'w').write('x')\n"
               f"  except OSError:\n"
               f"    continue\n"
               f"  raise SystemExit(1)\n")
    assert run_python(program, 5.0)
    assert list(open_dir.iterdir()) == [] and not Path("/tmp/esft_escaped.txt").exists()
  finally:
    open_dir.rmdir()


@needs_namespaces
def test_a_child_interpreter_cannot_reach_localhost():
  with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    program = (f"import subprocess, sys\n"
               f"subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"  # children do start
               f"connect = 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=2)'\n"
               f"raise SystemExit(subprocess.run([sys.executable, '-c', connect]).returncode == 0)\n")
    assert run_python(program, 10.0)
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
      server.accept()


@needs_namespaces
@pytest.mark.parametrize("main_waits", [True, False])
def test_a_setsid_grandchild_dies_with_the_program(main_waits):
  token = f"esft-sandbox-{uuid.uuid4().hex}"
  program = (f"import subprocess, sys, time\n"
             f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {token!r}],\n"
             f"                 start_new_session=True)\n"
             f"time.sleep({30 if main_waits else 0})\n")
  start = time.monotonic()
  assert run_python(program, 1.5) is not main_waits  # killed at the timeout, or ended on its own
  assert time.monotonic() - start < 10
  assert _none_left(token)


@needs_namespaces
def test_a_fork_bomb_is_bounded():
  token = f"esft-sandbox-{uuid.uuid4().hex}"
  program = (f"import os\n"
             f"for forked in range(500):\n"
             f"  try:\n"
             f"    if os.fork() == 0:\n"
             f"      os.execv('/bin/sh', ['sh', '-c', 'sleep 30', {token!r}])\n"
             f"  except OSError:\n"
             f"    raise SystemExit(0 if forked <= sandbox_processes else 1)\n"
             f"raise SystemExit(1)\n").replace("sandbox_processes", str(sandbox.LIMITS["RLIMIT_NPROC"]))
  assert run_python(program, 10.0)
  assert _none_left(token)


@needs_namespaces
def test_a_huge_allocation_fails():
  program = ("try:\n"
             f"  block = bytearray({2 * sandbox.LIMITS['RLIMIT_AS']})\n"
             "except MemoryError:\n"
             "  raise SystemExit(0)\n"
             "raise SystemExit(1)\n")
  assert run_python(program, 5.0)


@needs_namespaces
def test_a_huge_file_fails():
  program = ("try:\n"
             "  with open('big.bin', 'wb') as f:\n"
             f"    for _ in range({2 * sandbox.LIMITS['RLIMIT_FSIZE'] // 2**20}):\n"
             "      f.write(bytes(2**20))\n"
             "except OSError:\n"
             "  raise SystemExit(0)\n"
             "raise SystemExit(1)\n")
  assert run_python(program, 5.0)


@needs_namespaces
def test_the_program_runs_unprivileged():
  program = ("import os\n"
             "try:\n"
             "  os.setresuid(0, 0, 0) if os.getuid() else os.sethostname('x')\n"
             "except OSError:\n"
             "  raise SystemExit(0)\n"
             "raise SystemExit(1)\n")
  assert run_python(program, 5.0)


def test_without_namespaces_code_still_runs_and_a_warning_says_so(monkeypatch):
  monkeypatch.setattr(sandbox, "_isolation", None)
  monkeypatch.setattr(sandbox, "_probe", lambda: "no namespaces in this test")
  with pytest.warns(RuntimeWarning, match="weak isolation .*: no namespaces in this test"):
    assert sandbox.isolation() == "limits only"
  assert run_python("import os\nassert os.getcwd().endswith('scratch')", 5.0)
  assert not run_python("raise SystemExit(3)", 5.0)


@needs_namespaces
@pytest.mark.skipif(os.geteuid() != 0, reason="only root's sandbox runs programs as another user")
def test_an_interpreter_under_a_folder_closed_to_others_runs(tmp_path, monkeypatch):
  # As a checkout in a 0700 temporary folder holds its virtual environment: `nobody` cannot look inside.
  closed = tmp_path / "closed"
  (closed / "venv" / "bin").mkdir(parents=True)
  interpreter = closed / "venv" / "bin" / "python"
  interpreter.symlink_to(os.path.realpath(sys.executable))
  closed.chmod(0o700)
  monkeypatch.setattr(sys, "executable", str(interpreter))
  status, error = sandbox._run("import sys\nassert sys.executable.startswith(%r)" % str(closed), 10.0,
                               isolated=True, keep_stderr=True)
  assert status == 0, error
