"""Runs model-written Python (the code metric's programs) as isolated as the machine allows.

Where Linux namespaces can be made (root, or unprivileged user namespaces allowed; util-linux's `unshare`, which
every Linux distribution ships), a program runs
- in a new network namespace: no interface but a loopback that is down, so nothing, not even 127.0.0.1, answers;
- in a new mount namespace where every mount is read-only (one recursive `mount_setattr`, Linux 5.12+) except a
  private scratch folder, a size-capped tmpfs that only the program sees and that vanishes with it;
- in a new PID namespace whose init is this file's launcher: when the program ends or the timeout kills the
  launcher, the kernel kills every process left in the namespace, `setsid` daemons included (and in new IPC
  and UTS namespaces);
- without privileges: the capability bounding set emptied and no_new_privs set (setuid binaries grant nothing);
  started by root, it also drops to the unprivileged uid and gid 65534 (`nobody`), because root without
  capabilities still owns every root-owned file, socket and device node, and a read-only mount does not stop a
  write to a device or a connection to a Unix socket;
- under resource limits (`setrlimit`): CPU seconds, address space, processes, file size, open files, no core.

Where namespaces cannot be made (a container without the privilege, a kernel without mount_setattr), programs
run with the limits alone, in a fresh `python -I` with a scratch working folder and the process group killed on
timeout: a guard against accidents, not attacks. A warning says so once per process. `isolation()` says which
applies. Either way a program starts with socket creation patched out (NETWORK_GUARD), no stdin, no output kept
and a minimal environment.

Run as a script, this file is the launcher (stdlib only, since the sandboxed interpreter runs with -I).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

CODE_TIMEOUT_S = 5.0
SANDBOX_UID = 65534  # nobody
SCRATCH_MB = 64
LIMITS = {  # resource name -> soft and hard limit; RLIMIT_CPU is set from the timeout
    "RLIMIT_AS": 2 * 2**30,
    "RLIMIT_NPROC": 64,
    "RLIMIT_FSIZE": 32 * 2**20,
    "RLIMIT_NOFILE": 256,
    "RLIMIT_CORE": 0,
}
SETUP_FAILED = 125  # the launcher's exit status when it could not build the sandbox
# Prepended to every program: socket creation raises, so tests cannot reach the network by accident where no
# network namespace stops them. A subclass (not a function) keeps modules that subclass socket.socket at import
# time (ssl) importable.
NETWORK_GUARD = """\
import socket as _guard_socket, _socket as _guard_c_socket
class _NoNetworkSocket(_guard_socket.socket):
  def __init__(self, *args, **kwargs):
    raise PermissionError("network access is disabled while evaluating generated code")
_guard_socket.socket = _guard_c_socket.socket = _NoNetworkSocket
del _guard_socket, _guard_c_socket, _NoNetworkSocket
"""

_isolation: str | None = None  # "namespaces" or "limits only", decided on first use
_isolation_reason = ""


def run_python(program: str, timeout_s: float = CODE_TIMEOUT_S) -> bool:
  """True iff `program` exits with status 0 within `timeout_s` seconds, run as `isolation()` allows."""
  return _run(program, timeout_s, isolated=isolation() == "namespaces")[0] == 0


def isolation() -> str:
  """"namespaces" where this machine can build the sandbox (checked once, by running a program in it), else
  "limits only", with a warning naming the reason."""
  global _isolation, _isolation_reason
  if _isolation is None:
    _isolation_reason = _probe()
    _isolation = "limits only" if _isolation_reason else "namespaces"
    if _isolation_reason:
      warnings.warn(f"generated code runs with weak isolation (resource limits and a patched socket module, no "
                    f"namespaces): {_isolation_reason}", RuntimeWarning, stacklevel=2)
  return _isolation


def _probe() -> str:
  """Why the namespace sandbox cannot run here, or "" when a program ran in it as expected."""
  if sys.platform != "linux":
    return f"Linux namespaces are not available on {sys.platform}"
  if shutil.which("unshare") is None:
    return "util-linux's `unshare` is not installed"
  # The probe checks what a sandboxed program must be able to do: start Python as the sandbox's user, write
  # its scratch folder, and find everything else read-only.
  probe = ("import os, tempfile\n"
           "open('scratch_file', 'w').write('ok')\n"
           "try:\n"
           "  tempfile.NamedTemporaryFile(dir='/tmp')\n"
           "except OSError:\n"
           "  raise SystemExit(0)\n"
           "raise SystemExit(3)\n")
  status, error = _run(probe, 20.0, isolated=True, keep_stderr=True)
  if status == 0:
    return ""
  if status == SETUP_FAILED:
    return error.strip().splitlines()[-1] if error.strip() else "the sandbox could not be set up"
  return f"a probe program exited with status {status} in the sandbox ({error.strip()[-300:] or 'no output'})"


def _run(program: str, timeout_s: float, isolated: bool, keep_stderr: bool = False) -> tuple[int | None, str]:
  """The exit status of `program` (None on timeout) and, with `keep_stderr`, what it wrote to stderr."""
  with tempfile.TemporaryDirectory(prefix="esft_code_", ignore_cleanup_errors=True) as folder:
    folder = Path(folder)
    program_path = folder / "program.py"
    program_path.write_text(NETWORK_GUARD + program, encoding="utf-8")
    scratch = folder / "scratch"
    scratch.mkdir()
    # The sandbox's user must reach the program; the folder holds nothing else (scratch is a tmpfs inside).
    folder.chmod(0o755)
    program_path.chmod(0o644)
    limits = {**LIMITS, "RLIMIT_CPU": math.ceil(timeout_s) + 1}
    drop_to = SANDBOX_UID if os.geteuid() == 0 else -1
    launcher = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "isolated" if isolated else "limits",
                str(scratch), str(program_path), json.dumps(limits), str(drop_to)]
    if isolated:
      namespaces = ["--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
      user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
      launcher = ["unshare", *user, *namespaces, "--", *launcher]
    env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
    process = subprocess.Popen(launcher, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE if keep_stderr else subprocess.DEVNULL, start_new_session=True)
    try:
      _, error = process.communicate(timeout=timeout_s)
      status = process.returncode
    except subprocess.TimeoutExpired:
      # The leader is not reaped yet, so its group id cannot have been reused. Killing `unshare` and the
      # namespace's init (its group) makes the kernel kill everything else in the PID namespace.
      os.killpg(process.pid, signal.SIGKILL)
      _, error = process.communicate()
      status = None
  return status, (error or b"").decode("utf-8", "replace")


# --- the launcher: runs inside the new namespaces (or alone, for "limits") ------------------------------------

_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_SYS_MOUNT_SETATTR = 442  # one number on every architecture (syscalls added since Linux 5.1 share it)
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38
_CAP_VERSION_3 = 0x20080522
_ZEROS = (ctypes.c_ulong(0),) * 3  # prctl's unused arguments, as the unsigned longs it reads


class _MountAttr(ctypes.Structure):
  _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
              ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _open_the_way(libc, target: Path) -> None:
  """Lets any user reach `target` (the interpreter, its library, the program) where a folder above it is closed
  to others (a Python installed under root's 0700 home): an open tmpfs covers that folder, holding only the way
  down to `target`, bind-mounted from the original. The folder's other contents stay hidden."""
  for folder in list(target.parents)[::-1][1:]:
    if folder.stat().st_mode & 0o001:
      continue
    inner = folder / target.relative_to(folder).parts[0]
    original, is_dir = os.open(inner, os.O_PATH), inner.is_dir()
    _check(libc.mount(b"tmpfs", str(folder).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=0755"),
           f"covering {folder}")
    inner.mkdir() if is_dir else inner.touch()
    _check(libc.mount(f"/proc/self/fd/{original}".encode(), str(inner).encode(), None, _MS_BIND | _MS_REC, None),
           f"exposing {inner}")
    os.close(original)


def _seal_file_system(libc, scratch: str, reachable: list[Path]) -> None:
  """Every mount read-only, then a fresh tmpfs over the scratch folder (a new mount, so writable)."""
  for target in reachable:
    _open_the_way(libc, target)
  attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
  # syscall() is variadic and reads every argument as a long: pass longs, not ctypes' default int.
  _check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), b"/", ctypes.c_long(_AT_RECURSIVE),
                      ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr))),
         "making the file system read-only (mount_setattr, Linux 5.12+)")
  _check(libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                    f"size={SCRATCH_MB}m,mode=0777".encode()), "mounting the scratch tmpfs")


def _drop_privileges(libc, uid: int) -> None:
  """No capability can come back (empty bounding set, no_new_privs); root also becomes `uid`."""
  last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
  for cap in range(last_cap + 1):
    _check(libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), *_ZEROS), f"dropping capability {cap}")
  _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), *_ZEROS), "setting no_new_privs")
  if uid >= 0:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
  _check(libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), (_CapData * 2)()), "clearing capabilities")


def _set_limits(limits: dict[str, int]) -> None:
  for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))


def _exec_program(scratch: str, program: str) -> None:
  os.chdir(scratch)
  # One BLAS/OpenMP thread: on a many-core machine, numpy's thread pools alone would reserve much of RLIMIT_AS.
  env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
         "OPENBLAS_NUM_THREADS": "1"}
  os.execve(sys.executable, [sys.executable, "-I", program], env)


def _launch(mode: str, scratch: str, program: str, limits_json: str, drop_to: str) -> None:
  limits = json.loads(limits_json)
  if mode == "limits":
    _set_limits(limits)
    _exec_program(scratch, program)
  libc = ctypes.CDLL(None, use_errno=True)
  # The interpreter as it is named (a virtual environment's link, under a folder that may be closed to others, as
  # a checkout in a 0700 temporary folder is), the file it links to, and the installations it reads.
  reachable = [Path(os.path.abspath(sys.executable)),
               *(Path(p).resolve() for p in (sys.executable, sys.prefix, sys.base_prefix, program))]
  try:
    _seal_file_system(libc, scratch, reachable)
  except OSError as e:
    print(f"sandbox setup failed: {e}", file=sys.stderr)
    sys.exit(SETUP_FAILED)
  child = os.fork()
  if child == 0:
    try:
      _drop_privileges(libc, int(drop_to))
      _set_limits(limits)
      _exec_program(scratch, program)
    except OSError as e:
      print(f"sandbox setup failed: {e}", file=sys.stderr)
      os._exit(SETUP_FAILED)
  # This process is the PID namespace's init: when it exits, the kernel kills whatever the program left.
  code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
  sys.exit(code if code >= 0 else 128 - code)  # a signal's number as a shell reports it


if __name__ == "__main__":
  _launch(*sys.argv[1:])
