"""py-spy during a benchmark step, and a text summary of where the time went.

`record()` starts py-spy on a process (non-blocking sampling: the target is not paused,
so the profile barely perturbs the latency it explains; only the thread holding the GIL
is sampled, so the samples are Python CPU time, not threads waiting on I/O).
`summarize()` reads py-spy's raw (collapsed-stack) output and answers three questions:
which functions burn CPU
themselves (self), which call paths contain the most samples (inclusive), and which
layer of the stack (event loop, WebSocket protocol, channel layer, ORM, ...) owns them.

    python -m loadtests.bench.profile loadtests/results/<file>.txt   # print a summary
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

# First match wins: (layer, substring of the frame's file path or name).
LAYERS = [
    ("parley: realtime consumer/node", "parley/realtime/"),
    ("parley: chat domain", "parley/chat/"),
    ("parley: worker", "parley/worker/"),
    ("parley: accounts/web/config", "parley/"),
    ("load generator", "loadtests/"),
    ("channels_redis (layer)", "channels_redis/"),
    ("redis-py", "redis/"),
    ("channels (consumer plumbing)", "channels/"),
    ("asgiref (sync<->async)", "asgiref/"),
    ("django ORM", "django/db/"),
    ("django other", "django/"),
    ("psycopg", "psycopg"),
    ("uvicorn protocol", "uvicorn/"),
    ("websockets", "websockets/"),
    ("celery/kombu", "celery/"),
    ("celery/kombu", "kombu/"),
    ("celery/kombu", "billiard/"),
    ("prometheus_client", "prometheus_client/"),
    ("logging", "logging/"),
    ("event loop (uvloop, native)", "asyncio/runners.py"),
    ("event loop (uvloop, native)", "uvloop/"),
    ("asyncio", "asyncio/"),
    ("threads/executor", "threading.py"),
    ("threads/executor", "concurrent/"),
    ("json", "json"),
]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def record(
    pid: int,
    out: Path,
    seconds: float,
    *,
    fmt: str = "raw",
    subprocesses: bool = False,
    rate: int = 100,
) -> subprocess.Popen:
    argv = [
        PY_SPY,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--nonblocking",
        "--gil",
        "--format",
        fmt,
        "--output",
        str(out),
    ]
    if subprocesses:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or b"").decode(errors="replace")[-2000:]


def _parse_frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file") or ""


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "services/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return file


def layer_of(func: str, file: str) -> str:
    where = f"{file} {func}"
    for layer, needle in LAYERS:
        if needle in where:
            return layer
    if file.endswith(">") or not file:
        return "native/other"
    return "stdlib/other"


def summarize(path: Path, top: int = 15) -> dict:
    """Self and inclusive samples per function, and self samples per layer."""
    self_time: Counter = Counter()
    incl: Counter = Counter()
    layers: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_parse_frame(f) for f in stack.split(";")]
        # py-spy's first entries name the process/thread, not code.
        frames = [f for f in frames if f[1]] or frames
        leaf_func, leaf_file = frames[-1]
        self_time[f"{leaf_func} ({_short(leaf_file)})"] += n
        layers[layer_of(leaf_func, leaf_file)] += n
        for key in {f"{f} ({_short(fl)})" for f, fl in frames}:
            incl[key] += n

    def table(counter: Counter) -> list[dict]:
        return [
            {"what": k, "samples": v, "pct": round(100 * v / total, 1) if total else 0}
            for k, v in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": table(self_time),
        "inclusive": table(incl),
        "layers": table(layers),
    }


def markdown(summary: dict, title: str) -> str:
    lines = [
        f"#### {title} ({summary['samples']} samples)",
        "",
        "| layer (self time) | % |",
        "|---|---|",
    ]
    lines += [f"| {r['what']} | {r['pct']} |" for r in summary["layers"]]
    lines += ["", "| function (self) | % |", "|---|---|"]
    lines += [f"| `{r['what']}` | {r['pct']} |" for r in summary["self"]]
    lines += ["", "| call path contains (inclusive) | % |", "|---|---|"]
    lines += [f"| `{r['what']}` | {r['pct']} |" for r in summary["inclusive"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(markdown(summarize(Path(arg)), arg))
