"""What the kernel says of the wall clock: synchronised or not, its estimated error, the boot.

`adjtimex(2)` with `modes = 0` only reads (no privilege needed): its `status` has STA_UNSYNC set
until a time daemon (chrony, ntpd, systemd-timesyncd) has disciplined the clock, and `esterror`
is the daemon's estimate of the clock's error in µs. The struct is read with ctypes: no
maintained Python binding of adjtimex exists (the PyPI `adjtimex` packages are unmaintained
ctypes wrappers too). `struct timex` is the same on x86_64 and aarch64, both LP64 under glibc:
208 bytes, `esterror` at offset 32 and `status` at 40 (tests/test_clock.py checks the layout).

Where a system call filter refuses adjtimex (the packaged systemd unit), `KernelClockReader`
falls back to systemd-timesyncd's flag file: synchronised or not, the error unknown.

The boot id (`/proc/sys/kernel/random/boot_id`) is a random UUID the kernel makes at each boot:
CLOCK_MONOTONIC readings compare only within one boot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
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
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
"""Made by systemd-timesyncd once it has synchronised the clock (systemd 239 and later)."""


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


LIBC_ADJTIMEX = _libc_adjtimex()
"""libc's adjtimex, or None where there is none (not Linux)."""


class KernelClockReader:
    """Reads the clock's state: adjtimex(modes=0), or systemd-timesyncd's flag file when the
    call is refused.

    The packaged unit's system call filter (`ProtectClock=yes`, `~@privileged`) refuses even
    a read of adjtimex (EPERM; systemd issue 26413). The reader then says what
    systemd-timesyncd says: `TIMESYNC_FLAG` exists once it has synchronised the clock (the file
    systemd-time-wait-sync waits for); the error is unknown. Sites with chrony or ntpd allow
    the read in a drop-in (docs/operations.md, Sites without NTP). `adjtimex` (a ctypes
    function taking a Timex pointer) and `flag` are for tests. Never raises.
    """

    def __init__(
        self, adjtimex: Callable[[Any], int] | None = LIBC_ADJTIMEX, flag: Path = TIMESYNC_FLAG
    ) -> None:
        self._adjtimex = adjtimex
        self._flag = flag

    def __call__(self) -> KernelClock:
        if self._adjtimex is not None:
            timex = Timex()  # modes = 0: read only
            if self._adjtimex(ctypes.byref(timex)) != -1:
                return kernel_clock(timex)
            log.warning(
                "Cannot read the clock's state (adjtimex) error=%s: using flag=%s (synchronised"
                " when it exists, error unknown)",
                os.strerror(ctypes.get_errno()), self._flag,
            )  # fmt: skip
            self._adjtimex = None
        return KernelClock(synced=self._flag.exists(), error_ns=None)


read_kernel_clock = KernelClockReader()
"""The clock's state now (a KernelClock): adjtimex, or the timesyncd flag when refused."""


def boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id (a UUID as text); "" when the kernel does not say (not Linux)."""
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
