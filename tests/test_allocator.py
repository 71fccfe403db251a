"""keep_freed_memory(): a freed large block is reused instead of being faulted in again (glibc)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synthsr_bids import allocator

# In a child process (the setting is process-wide and permanent): allocate, touch and free a
# 96 MB tensor, then a 64 MB one (both above glibc's 32 MB mmap ceiling; torch, unlike numpy, does
# not ask for transparent huge pages), and count the minor page faults of the second. Without the
# setting glibc unmaps the first block and the kernel faults in all 16,384 pages of the second; with
# it the second is carved out of the first. (The second is smaller because torch's 64-byte-aligned
# requests need a little more than a block of the same size.)
_CHILD = """
import json, resource, sys
import torch
from synthsr_bids.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def touch(megabytes):
    a = torch.empty(megabytes * 2**20, dtype=torch.uint8)
    a[::4096] = 1
    del a
touch(96)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch(64)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _second_round(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default = _second_round("default")
    kept = _second_round("keep")
    assert not default["kept"] and kept["kept"]
    pages = 64 * 2**20 // 4096
    assert default["faults"] >= 0.9 * pages  # unmapped and faulted in again (transparent huge pages off)
    assert kept["faults"] < 0.05 * pages  # the same heap memory, already mapped


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False
