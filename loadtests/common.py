"""Pieces shared by the Locust scenarios and the benchmark: latency summaries, message
bodies that carry their send time, per-socket stream accounting (order, duplicates) and
the final check of what every socket received against the conversation's history.

No Django, no Locust, no asyncio here: both tools import it.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtests" / "results"


# --- latency summaries ---------------------------------------------------------------


class Percentiles:
    """Every sample kept (a float array: 8 bytes each), exact percentiles on demand.

    Runs here record at most a few million samples; exact beats a histogram's buckets
    when a threshold (p99 < 250 ms) decides pass or fail.
    """

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values = array("d")

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def extend(self, other: Percentiles) -> None:
        self.values.extend(other.values)

    def __len__(self) -> int:
        return len(self.values)

    def quantile(self, q: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        # Nearest rank: the smallest value with at least q of the samples at or below it.
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]

    def summary_ms(self) -> dict:
        """count, mean and p50/p90/p95/p99/p99.9/max in milliseconds (None when empty)."""
        n = len(self.values)
        if not n:
            return {
                "count": 0,
                "mean": None,
                "p50": None,
                "p90": None,
                "p95": None,
                "p99": None,
                "p999": None,
                "max": None,
            }
        ordered = sorted(self.values)

        def at(q: float) -> float:
            return round(ordered[max(1, math.ceil(q * n)) - 1] * 1000, 3)

        return {
            "count": n,
            "mean": round(sum(ordered) / n * 1000, 3),
            "p50": at(0.50),
            "p90": at(0.90),
            "p95": at(0.95),
            "p99": at(0.99),
            "p999": at(0.999),
            "max": round(ordered[-1] * 1000, 3),
        }


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# --- message bodies ------------------------------------------------------------------

BODY_PREFIX = "lt"


def make_body(sent_at: float, tag: str, size: int = 80) -> str:
    """A message body that carries its send time: `lt <sent_at> <tag> xxxx...`.

    Receivers on any machine read the time back (`body_sent_at`); `size` pads it to a
    realistic length (chat messages are mostly short).
    """
    head = f"{BODY_PREFIX} {sent_at:.6f} {tag} "
    return head + "x" * max(0, size - len(head))


def body_sent_at(body: str) -> float | None:
    if not body.startswith(BODY_PREFIX + " "):
        return None
    try:
        return float(body.split(" ", 2)[1])
    except (IndexError, ValueError):
        return None


# --- one socket's view of one conversation ----------------------------------------------


@dataclass
class Stream:
    """The live `message` frames one socket got for one conversation.

    The server promises seq order with no gaps and no repeats on the live path; frames
    answering a `resume` are a replay and may repeat (the caller passes replay=True).
    """

    start: int  # the hello's last_seq: everything after it must arrive
    last: int = 0  # highest seq received
    seen: set = field(default_factory=set)
    duplicates: int = 0  # a live frame with a seq already received
    gaps: int = 0  # a live frame that skipped seqs (order violation)
    late: int = 0  # a live frame older than one already received, not a repeat

    def __post_init__(self) -> None:
        self.last = self.start

    def add(self, seq: int, *, replay: bool = False) -> bool:
        """Record a seq; returns whether it is new to this socket."""
        if seq in self.seen:
            if not replay:
                self.duplicates += 1
            return False
        if seq <= self.start:
            return False  # from before this socket's hello: not expected, not counted
        self.seen.add(seq)
        if not replay:
            if seq > self.last + 1:
                self.gaps += 1
            elif seq < self.last:
                self.late += 1
        if seq > self.last:
            self.last = seq
        return True

    def missing(self, until: int) -> int:
        """Seqs in (start, until] this socket never got."""
        expected = max(0, until - self.start)
        got = sum(1 for s in self.seen if self.start < s <= until)
        return expected - got

    @property
    def order_violations(self) -> int:
        return self.gaps + self.late


@dataclass
class HistoryCheck:
    """The end-of-run check against history: what was committed vs what was seen."""

    conversations: int = 0
    committed: int = 0  # messages in history in the checked ranges
    expected_deliveries: int = 0
    lost_deliveries: int = 0  # committed, after a socket's hello, never reached it
    duplicate_frames: int = 0
    order_violations: int = 0
    acked_missing: int = 0  # acknowledged sends not found in history (must be 0)
    duplicate_messages: int = 0  # one client_id committed twice (must be 0)
    unacked_sends: int = 0  # sends never acknowledged (lost by the server or pending)
    unacked_but_committed: int = 0  # committed, the ack never came (e.g. a socket closed)

    def merge(self, other: HistoryCheck) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def ok(self) -> bool:
        return not (
            self.lost_deliveries
            or self.duplicate_frames
            or self.order_violations
            or self.acked_missing
            or self.duplicate_messages
        )


def check_history(
    *,
    history: dict[int, list[tuple[int, str | None]]],
    streams: Iterable[tuple[int, Stream]],
    acked: Iterable[tuple[int, str]],
    unacked: Iterable[tuple[int, str]] = (),
) -> HistoryCheck:
    """Compare what sockets received with what was committed.

    history: conversation -> [(seq, client_id)] for every message after the earliest
    start of any socket, up to the end; streams: (conversation, Stream) per socket;
    acked/unacked: (conversation, client_id) of the sends made.
    """
    result = HistoryCheck(conversations=len(history))
    top = {cid: max((s for s, _ in rows), default=0) for cid, rows in history.items()}
    by_client_id: dict[int, Counter] = {}
    for cid, rows in history.items():
        result.committed += len(rows)
        by_client_id[cid] = Counter(c for _, c in rows if c)
    for cid, stream in streams:
        until = top.get(cid, stream.last)
        result.expected_deliveries += max(0, until - stream.start)
        result.lost_deliveries += stream.missing(until)
        result.duplicate_frames += stream.duplicates
        result.order_violations += stream.order_violations
    for cid, client_id in acked:
        count = by_client_id.get(cid, Counter()).get(client_id, 0)
        if count == 0:
            result.acked_missing += 1
        elif count > 1:
            result.duplicate_messages += 1
    for cid, client_id in unacked:
        result.unacked_sends += 1
        if by_client_id.get(cid, Counter()).get(client_id, 0):
            result.unacked_but_committed += 1
    return result


# --- the machine -------------------------------------------------------------------------


def machine() -> dict:
    """What the figures were measured on, and how busy it was."""
    info = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return info


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "services"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip() or None
    if rev and dirty.stdout.strip():
        rev += "+dirty"
    return rev


def stamp() -> str:
    """A sortable, filesystem-safe UTC timestamp for result files."""
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
