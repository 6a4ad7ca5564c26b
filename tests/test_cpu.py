import ctypes
import sys

import pytest

from lazydit import cpu


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tune_allocator_sets_glibc_and_is_idempotent(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cpu, "_tuned", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert cpu.tune_allocator() is True and cpu.tune_allocator() is True
    assert calls == [(cpu.M_MMAP_THRESHOLD, 32 * 2**20), (cpu.M_TRIM_THRESHOLD, 2**30)]  # once


def test_tune_allocator_without_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(cpu, "_tuned", None)

    def no_libc(name):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert cpu.tune_allocator() is False
