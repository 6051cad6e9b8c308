"""io.environment: keep_freed_memory keeps freed blocks mapped."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

from fastntk_jax.io import environment

_CHILD = textwrap.dedent("""
  import ctypes, sys
  from fastntk_jax.io.environment import keep_freed_memory
  kept = keep_freed_memory() if sys.argv[1] == "keep" else None
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = (ctypes.c_void_p,)
  def rss_mib():
    for line in open("/proc/self/status"):
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  n = 256 * 2**20
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  touched = rss_mib()
  libc.free(p)
  print(kept, touched, rss_mib())
""")


def _glibc() -> bool:
  return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(),
                    reason="mallopt's settings exist in glibc on Linux only")
def test_keep_freed_memory_keeps_a_freed_block_mapped():
  got = {}
  for mode in ("keep", "default"):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True,
                         capture_output=True, text=True).stdout.split()
    got[mode] = (out[0], float(out[1]), float(out[2]))
  kept, touched, after = got["keep"]
  assert kept == "True"
  assert after > touched - 16  # the 256 MiB block stays in the process
  _, touched, after = got["default"]
  assert after < touched - 200  # glibc's default hands it back


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
  class NoGlibc:
    def __init__(self, name):
      pass

    def __getattr__(self, name):
      raise AttributeError(name)

  monkeypatch.setattr(ctypes, "CDLL", NoGlibc)
  assert environment.keep_freed_memory() is False
