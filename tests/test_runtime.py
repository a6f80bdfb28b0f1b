"""helpers.core.runtime.tune_allocator: with it, a block larger than glibc's largest mmap
threshold (a training step's biggest activations) comes from the heap, whose freed memory stays
with the process, instead of being mapped and unmapped (page-faulted afresh) every time. Checked
with glibc's own accounting (``mallinfo2``: bytes held in mmapped blocks), in a fresh process
each, since the setting is process-wide. (How soon the heap reuses a freed block depends on what
else was allocated in between; the fits' peak memory is in docs/benchmarks.md.)"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
# mallinfo2 came with glibc 2.33; libc.so.6 is opened only where glibc is.
pytestmark = pytest.mark.skipif(
    not (GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")), reason="glibc 2.33 or later only"
)

PROBE = """
import ctypes, json, torch
from helpers.core import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = runtime.tune_allocator()
info = libc.mallinfo2
mapped = []
for step in range(8):  # one 80 MB block per step, as a training step's largest activation
    before = info()
    block = torch.ones(20_000_000)  # above the 32 MiB that glibc's mmap threshold may reach
    during = info()
    del block
    mapped.append(during.hblkhd - before.hblkhd)
print(json.dumps({"applied": applied, "mapped": mapped}))
"""


def _probe(mallopt: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["C2S_MALLOPT"] = mallopt
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_only_when_tuned():
    tuned, default = _probe("1"), _probe("0")
    assert tuned["applied"] and not default["applied"]
    assert all(m >= 80_000_000 for m in default["mapped"])  # glibc's default: mapped anew every step
    assert tuned["mapped"] == [0] * 8  # tuned: carved from the heap, which is never trimmed
