"""Progress of a long job (a build, engines, realign): one numbered line per finished
phase with its wall time and its peak resident memory, kept for the manifest.

Peak RSS per phase: Linux's VmHWM, reset at the start of each phase by writing 5 to
/proc/self/clear_refs.  Where that is not possible the process's peak so far is shown
and marked so.  Torch-free.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

GIB = 1024**3


def _vm(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS: glibc keeps what a
    large model's many medium allocations freed, so RSS would stay at the model's size
    after it is gone."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


def peak_rss() -> int:
    """Peak resident bytes since the last reset (VmHWM), else the process's peak."""
    hwm = _vm("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class PhaseRecord:
    phase: str
    seconds: float
    peak_rss_bytes: int
    peak_is_per_phase: bool

    def to_dict(self) -> dict:
        return asdict(self)


class Phases:
    """`with phases.phase("export decoder.onnx") as detail: ...` prints
    "[3/9] export decoder.onnx (12.3 s, peak RSS 4.10 GiB)" when the block ends; a phase
    may set `detail.text` to add words.  A nested job (a build inside a quantized build)
    gets `phases.nested(prefix)`: its peaks count towards the outer phase's."""

    def __init__(self, progress: Callable[[str], None], total: int = 0, parent: "Phases | None" = None) -> None:
        self.progress, self.total, self.parent = progress, total, parent
        self.count = 0
        self.records: list[PhaseRecord] = []
        self._inner_peak = 0

    def nested(self, prefix: str = "      ") -> "Phases":
        return Phases(lambda line: self.progress(prefix + line), parent=self)

    def child_peak(self, child_peak: int) -> None:
        """A child process's peak, while this process waited: counted with this one's RSS."""
        now = _vm("VmRSS") or 0
        self._report_peak(now + child_peak)

    def _report_peak(self, peak: int) -> None:
        self._inner_peak = max(self._inner_peak, peak)
        if self.parent is not None:
            self.parent._report_peak(peak)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator["_Detail"]:
        per_phase = _reset_peak()
        self._inner_peak = 0
        detail = _Detail()
        t0 = time.perf_counter()
        yield detail
        seconds = time.perf_counter() - t0
        peak = max(peak_rss(), self._inner_peak)
        if self.parent is not None:
            self.parent._report_peak(peak)
        self.count += 1
        text = what + (f" {detail.text}" if detail.text else "")
        mark = "" if per_phase else " so far"
        self.progress(f"[{self.count}/{self.total or '?'}] {text} ({seconds:.1f} s, peak RSS{mark} {peak / GIB:.2f} GiB)")
        self.records.append(PhaseRecord(what, round(seconds, 2), peak, per_phase))

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self.records]


class _Detail:
    text = ""
