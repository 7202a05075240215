"""Markdown for a benchmark run: the summary table (also written into docs/benchmarks.md
between its markers) and the per-step tables of the dated result file."""

from __future__ import annotations

import re
from pathlib import Path

from loadtests.common import REPO, fmt_ms

START = "<!-- bench:summary:start -->"
END = "<!-- bench:summary:end -->"


def _step_at(search: dict | None, rate: float) -> dict | None:
    """The passing step closest to `rate` (at or below it)."""
    if not search:
        return None
    steps = [s for s in search["steps"] if s.get("passed") and s["rate"] <= rate]
    return max(steps, key=lambda s: s["rate"]) if steps else None


def headline(cfg: dict) -> dict:
    rooms = cfg.get("rooms") or {}
    best = rooms.get("best") or {}
    large = cfg.get("large_room") or {}
    idle = cfg.get("idle_sockets") or {}
    at200 = _step_at(rooms, 200)
    d = best.get("send_delivery_ms") or {}
    r = best.get("receipt_lag_ms") or {}
    return {
        "rooms_best": rooms.get("best_rate"),
        "rooms_first_failure": rooms.get("first_failure"),
        "deliveries_per_s": best.get("deliveries_per_s"),
        "delivery_p50": d.get("p50"),
        "delivery_p99": d.get("p99"),
        "ack_p50_at": (at200["rate"], at200["send_ack_ms"]["p50"]) if at200 else None,
        "large_best": large.get("best_rate"),
        "sockets_per_s": idle.get("per_second"),
        "storm_per_s": (cfg.get("storm") or {}).get("per_second"),
        "kib_per_socket": round(idle["bytes_per_socket"] / 1024, 1)
        if idle.get("bytes_per_socket") is not None
        else None,
        "receipt_p50": r.get("p50"),
        "receipt_p99": r.get("p99"),
        "large_first_failure": large.get("first_failure"),
        "rooms_top": bool(rooms) and rooms.get("first_failure") is None,
        "large_top": bool(large) and large.get("first_failure") is None,
        # Configurations without a worker have nobody draining the queue: no figure.
        "queue_max": None
        if cfg.get("config") == "noop" or cfg.get("config", "").endswith("-noworker")
        else (best.get("queue_depth") or {}).get("ready_max"),
        "generator_bound": best.get("generator_bound"),
    }


SUMMARY_COLUMNS = [
    "config",
    "rooms: max msg/s (deliveries/s)",
    "delivery p50 / p99 ms at max",
    "send->ack p50 ms (at msg/s)",
    "large room max msg/s",
    "sockets opened /s: one replica (all replicas)",
    "KiB per idle socket",
    "receipt lag p50 / p99 ms",
    "max receipts queue",
]
STEP_COLUMNS = [
    "msg/s",
    "result",
    "sent",
    "deliveries/s",
    "ack p50 / p99 ms",
    "delivery p50 / p95 / p99 / max ms",
    "receipt lag p50 / p99 ms",
    "lost",
    "order",
    "dup",
    "gen lag p99 ms",
    "CPU cores (rt A, rt B, web, worker, pg, gen)",
    "load",
    "file refaults/s",
]


def _bound(best, first_failure, top: bool) -> str:
    """The highest passing rate, "< r" when even the lowest failed, ">= r" when none did."""
    if best is None:
        return f"< {_num(first_failure)}" if first_failure is not None else "-"
    return f">= {_num(best)}" if top else _num(best)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _num(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def summary_table(run: dict) -> str:
    s, m = run["settings"], run["machine"]
    lines = [
        f"Run {run['started']} (`{run['command']}`), revision {run.get('revision')}, "
        f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"load average at start {m['loadavg']}, at end {run.get('loadavg_end')}.",
        f"Bar: zero loss, zero order violations, every send acked, p99 send->delivery "
        f"< {s['p99_ms']:g} ms. Rooms: {s['rooms']} x {s['room_size']} members over "
        f"{s['replicas']} replicas, {s['duration']:g} s steps; "
        f"large room: {s['large_size']} members.",
        "",
        _row(SUMMARY_COLUMNS),
        _row(["---"] * len(SUMMARY_COLUMNS)),
    ]
    heads = {name: headline(cfg) for name, cfg in run["configs"].items()}
    for name, h in heads.items():
        ack = (
            f"{fmt_ms(h['ack_p50_at'][1])} (at {h['ack_p50_at'][0]:g})" if h["ack_p50_at"] else "-"
        )
        best = _bound(h["rooms_best"], h["rooms_first_failure"], h["rooms_top"])
        storm = f" ({_num(h['storm_per_s'])})" if h["storm_per_s"] else ""
        large = _bound(h["large_best"], h["large_first_failure"], h["large_top"])
        lines.append(
            f"| {name}{' (generator ceiling)' if name == 'noop' else ''} "
            f"| {best} ({_num(h['deliveries_per_s'])})"
            f"{' [generator late]' if h['generator_bound'] else ''} "
            f"| {fmt_ms(h['delivery_p50'])} / {fmt_ms(h['delivery_p99'])} | {ack} "
            f"| {large} | {_num(h['sockets_per_s'])}{storm} | {_num(h['kib_per_socket'])} "
            f"| {fmt_ms(h['receipt_p50'])} / {fmt_ms(h['receipt_p99'])} | {_num(h['queue_max'])} |"
        )
    p, n = heads.get("parley"), heads.get("naive")
    if p and n:

        def ratio(a, b, inverse=False):
            if not a or not b:
                return "-"
            return f"{(b / a if inverse else a / b):.1f}x"

        lines += [
            "",
            "Ratios measured in this run (parley / naive): rooms max rate "
            f"{ratio(p['rooms_best'], n['rooms_best'])}, large room max rate "
            f"{ratio(p['large_best'], n['large_best'])}, sockets opened per second "
            f"{ratio(p['sockets_per_s'], n['sockets_per_s'])} (all replicas "
            f"{ratio(p['storm_per_s'], n['storm_per_s'])}), memory per idle socket "
            f"{ratio(p['kib_per_socket'], n['kib_per_socket'], inverse=True)} less.",
        ]
    if heads.get("noop") and p and heads["noop"]["rooms_best"] and p["rooms_best"]:
        share = 100 * p["rooms_best"] / heads["noop"]["rooms_best"]
        higher = (
            " (which never failed: its ceiling is higher)" if heads["noop"]["rooms_top"] else ""
        )
        lines.append(
            f"Parley reaches {share:.1f} % of the rate the generator sustains against the no-op "
            f"server{higher}."
        )
    return "\n".join(lines)


def _steps_table(search: dict) -> list[str]:
    lines = [_row(STEP_COLUMNS), _row(["---"] * len(STEP_COLUMNS))]
    for s in search["steps"]:
        d, a, h = s["send_delivery_ms"], s["send_ack_ms"], s["history"]
        r = s.get("receipt_lag_ms") or {}
        cpu = s.get("cpu_cores", {})
        cores = (
            ", ".join(
                f"{cpu[k]:.2f}" if cpu.get(k) is not None else "-"
                for k in (
                    "realtime-A",
                    "realtime-B",
                    "web",
                    "worker",
                    "postgres backends",
                    "generator",
                )
            )
            if "realtime-A" in cpu
            else f"noop {cpu.get('noop', 0):.2f}, gen {cpu.get('generator', 0):.2f}"
        )
        verdict = "pass" if s["passed"] else "FAIL: " + "; ".join(s["reasons"])
        if s.get("generator_bound"):
            verdict += " (generator late)"
        lines.append(
            _row(
                [
                    f"{s['rate']:g}",
                    verdict,
                    s["sent"],
                    _num(s["deliveries_per_s"]),
                    f"{fmt_ms(a['p50'])} / {fmt_ms(a['p99'])}",
                    " / ".join(fmt_ms(d[k]) for k in ("p50", "p95", "p99", "max")),
                    f"{fmt_ms(r.get('p50'))} / {fmt_ms(r.get('p99'))}",
                    h["lost_deliveries"],
                    h["order_violations"],
                    h["duplicate_frames"],
                    fmt_ms(s["generator_lag_ms"]["p99"]),
                    cores,
                    s["loadavg"][1],
                    _num(s.get("file_refaults_per_s")),
                ]
            )
        )
    return lines


def _opened(o: dict) -> str:
    """A socket-opening phase (generator.open_all's figures) in words."""
    t = o["time_to_hello_ms"]
    return (
        f"{o['opened']}/{o['sockets']} opened in {o['seconds']} s ({o['per_second']}/s), "
        f"time to hello p50/p99 {fmt_ms(t['p50'])}/{fmt_ms(t['p99'])} ms"
    )


def markdown(run: dict) -> str:
    from loadtests.bench import profile as pyspy

    lines = [f"# Benchmark run {run['started']}", "", summary_table(run), ""]
    lines += ["## Machine", "", "```", *(f"{k}: {v}" for k, v in run["machine"].items()), "```", ""]
    for name, cfg in run["configs"].items():
        lines += [f"## {name}", "", f"Environment: `{cfg.get('env', {})}`", ""]
        idle = cfg.get("idle_sockets")
        if idle:
            lines += [
                f"Idle sockets: {_opened(idle)}; realtime-A RSS "
                f"{idle['rss_before_mb']} -> {idle['rss_after_mb']} MiB = "
                f"{idle['bytes_per_socket']:,} bytes per socket; failed {idle['failed']}; "
                f"load {idle['loadavg']}.",
                "",
            ]
            storm = cfg.get("storm")
            if storm:
                lines += [
                    f"Storm over {storm['replicas']} replicas (the same users again, token "
                    f"caches expired): {_opened(storm)}; failed {storm['failed']}; "
                    f"cores {storm['cores']}.",
                    "",
                ]
            if idle.get("profile"):
                lines += [
                    pyspy.markdown(
                        idle["profile"]["summary"],
                        f"realtime-A while sockets open ({idle['profile']['file']})",
                    ),
                    "",
                ]
        for key, title in (("rooms", "Rooms"), ("large_room", "Large room")):
            search = cfg.get(key)
            if search:
                lines += [
                    f"### {title}: max {search['best_rate']} msg/s "
                    f"(first failure {search['first_failure']})",
                    "",
                ]
                lines += [*_steps_table(search), ""]
        prof = cfg.get("profile")
        if prof:
            lines += [f"### Profile at {prof['rate']:g} msg/s", "", f"Files: {prof['files']}", ""]
            for key, summary in prof.get("summaries", {}).items():
                lines += [pyspy.markdown(summary, key), ""]
        lines += [
            f"Close codes seen: {cfg.get('closes_total')}; "
            f"error frames: {cfg.get('errors_total')}; reconnects: {cfg.get('reconnects')}.",
            "",
        ]
    return "\n".join(lines)


def update_docs(docs: Path, run: dict, md_path: Path) -> None:
    """Replace the summary between the markers of docs/benchmarks.md (appended if absent)."""
    try:
        rel = md_path.resolve().relative_to(REPO)
    except ValueError:
        rel = md_path
    block = f"{START}\n{summary_table(run)}\n\nDetails: [`{rel}`](../{rel}).\n{END}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    docs.write_text(text)


if __name__ == "__main__":
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench.report",
        description="Render a benchmark result (JSON) as Markdown again; optionally put its "
        "summary into docs/benchmarks.md.",
    )
    parser.add_argument("result", type=Path)
    parser.add_argument("--docs", type=Path, help="update this file's summary block")
    args = parser.parse_args()
    run = json.loads(args.result.read_text())
    args.result.with_suffix(".md").write_text(markdown(run))
    if args.docs:
        update_docs(args.docs, run, args.result.with_suffix(".md"))
    print(summary_table(run))
    sys.exit(0)
