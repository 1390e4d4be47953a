"""What the kernel says of the wall clock: synchronised or not, its estimated error, the boot.

`adjtimex(2)` with `modes = 0` only reads (no privilege needed): its `status` has STA_UNSYNC set
until a time daemon (chrony, ntpd, systemd-timesyncd) has disciplined the clock, and `esterror`
is the daemon's estimate of the clock's error in µs. The struct is read with ctypes: no
maintained Python binding of adjtimex exists (the PyPI `adjtimex` packages are unmaintained
ctypes wrappers too). `struct timex` is the same on x86_64 and aarch64, both LP64 under glibc:
208 bytes, `esterror` at offset 32 and `status` at 40 (tests/test_clock.py checks the layout).

The boot id (`/proc/sys/kernel/random/boot_id`) is a random UUID the kernel makes at each boot:
CLOCK_MONOTONIC readings compare only within one boot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STA_UNSYNC = 0x0040
"""`status` bit: the clock is not synchronised (<sys/timex.h>)."""
NTP_PHASE_LIMIT_US = 16_000_000
"""The kernel's `esterror` and `maxerror` cap (16 s): an error this large means unknown."""
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class Timex(ctypes.Structure):
    """`struct timex` of <sys/timex.h> (glibc, LP64: x86_64 and aarch64); units as adjtimex(2)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


@dataclass(frozen=True)
class KernelClock:
    """The wall clock as the kernel sees it.

    `synced`: STA_UNSYNC is clear (a time daemon disciplines the clock); False also when the
    state cannot be read. `error_ns`: the kernel's estimated error in ns, None when unknown (not
    synchronised, the 16 s cap, or unreadable).
    """

    synced: bool
    error_ns: int | None


UNKNOWN = KernelClock(synced=False, error_ns=None)


def kernel_clock(timex: Timex) -> KernelClock:
    """The state in a `Timex` that adjtimex filled in."""
    synced = not timex.status & STA_UNSYNC
    known = synced and 0 <= timex.esterror < NTP_PHASE_LIMIT_US
    return KernelClock(synced, timex.esterror * 1000 if known else None)


def _libc_adjtimex() -> Callable[[Any], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.adjtimex
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.POINTER(Timex)]
    function.restype = ctypes.c_int
    return function


_ADJTIMEX = _libc_adjtimex()


def read_kernel_clock() -> KernelClock:
    """Read the clock's state with adjtimex(modes=0): a system call, microseconds; never raises.

    UNKNOWN (not synchronised, error unknown) when the call is missing or fails (not Linux, a
    seccomp filter), logged once.
    """
    global _ADJTIMEX  # noqa: PLW0603  # dropped after the first failure, logged once
    if _ADJTIMEX is None:
        return UNKNOWN
    timex = Timex()  # modes = 0: read only
    if _ADJTIMEX(ctypes.byref(timex)) == -1:
        log.warning("Cannot read the clock's state (adjtimex) error=%s: batches say not synced",
                    ctypes.get_errno())  # fmt: skip
        _ADJTIMEX = None
        return UNKNOWN
    return kernel_clock(timex)


def boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id (a UUID as text); "" when the kernel does not say (not Linux)."""
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
