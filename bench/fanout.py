"""Fan-out benchmark: one update to N webhook targets, against Apprise and bare aiohttp.

    .venv/bin/python bench/fanout.py [-n 10000] [--json]

A loopback sink (bench/sink.py) runs in its own process and answers 200 to any POST.
Three contenders, each in its own fresh subprocess (so each one's CPU and peak memory
are its own), POST to the same sink at distinct URLs `http://127.0.0.1:PORT/t/{i}`:

- incident-broadcaster: one webhook channel with N targets on a SQLite store in a temp
  folder; timed from `publish()` (update + N deliveries stored in one transaction) until
  `wait([update_id])` returns with every delivery settled in the store.
- Apprise: N `json://127.0.0.1:PORT/t/{i}` URLs in one `apprise.Apprise()`, one
  `async_notify()` (or `notify()` with `--apprise-mode sync`).
- bare aiohttp: one ClientSession, a semaphore of the same concurrency, N POSTs of a JSON
  body of the webhook body's size, `asyncio.gather`.

Every run is verified: the sink must have received exactly N POSTs per contender, and
the broadcaster's N deliveries must all be `delivered`. It also times `broadcaster
--help` (median of 10 runs after a warm-up). The last line with `--json` is one JSON
object with the figures. Exit status: 0, 1 when a verification failed, 2 with
`--strict` when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broadcaster.runtime import run as run_loop
from channels.webhook import WebhookChannel

HERE = Path(__file__).resolve().parent
SINK = HERE / "sink.py"
RESULT_PREFIX = "RESULT "

# The targets of the issue this benchmark answers.
TARGET_PER_S = 3000.0
TARGET_OVER_APPRISE = 4.5
TARGET_OVER_AIOHTTP = 0.5
TARGET_HELP_MS = 250.0

# An update a comms person would send; the webhook body it makes is about 700 bytes.
TITLE = "Card payments fail for some customers"
SUMMARY = (
    "Card payments fail for some customers in Europe since 14:05 UTC. Payments by bank "
    "transfer and wallets work. We are working with our payment provider on a fix."
)


# -- measuring in a worker process -------------------------------------------------------


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _timed(run: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    result = await run()
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {"seconds": seconds, "cpu_percent": 100 * cpu / seconds, **result}


async def measure_broadcaster(port: int, n: int, concurrency: int) -> dict[str, Any]:
    from broadcaster.config import Settings
    from broadcaster.core import Broadcaster
    from broadcaster.models import IncidentStatus, UpdateRequest

    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        folder = Path(tmp)
        settings = Settings(
            store=f"sqlite:///{folder / 'broadcaster.db'}",
            data_dir=folder / "data",
            config_path=folder / "broadcaster.toml",
            channels={
                "hooks": {
                    "type": "webhook",
                    "targets": [f"http://127.0.0.1:{port}/t/{i}" for i in range(n)],
                    "rate_limit": {},
                    "concurrency": concurrency,
                }
            },
        )
        opened = time.perf_counter()
        b = await Broadcaster.open(settings=settings)
        open_seconds = time.perf_counter() - opened
        try:
            request = UpdateRequest(
                status=IncidentStatus.INVESTIGATING,
                title=TITLE,
                fields={"summary": SUMMARY},
                actor="bench",
            )
            marks: dict[str, float] = {}

            async def run() -> dict[str, Any]:
                start = time.perf_counter()
                result = await b.publish(request)
                marks["publish_seconds"] = time.perf_counter() - start
                progress = await b.wait([result.update.id])
                counts: dict[str, int] = {}
                for channel in progress:
                    for state, count in channel.counts.items():
                        counts[state.value] = counts.get(state.value, 0) + count
                return {"states": counts}

            measured = await _timed(run)
        finally:
            await b.close()
    delivered = measured["states"].get("delivered", 0)
    return {
        **measured,
        **marks,
        "open_seconds": open_seconds,
        "delivered": delivered,
        "ok": delivered == n and sum(measured["states"].values()) == n,
    }


async def measure_apprise(port: int, n: int, mode: str) -> dict[str, Any]:
    import apprise

    notifier = apprise.Apprise()
    added = time.perf_counter()
    if not notifier.add([f"json://127.0.0.1:{port}/t/{i}" for i in range(n)]):
        raise RuntimeError("Apprise refused the json:// URLs")
    add_seconds = time.perf_counter() - added
    if len(notifier) != n:
        raise RuntimeError(f"Apprise loaded {len(notifier)} of {n} URLs")

    async def run() -> dict[str, Any]:
        if mode == "async":
            result = await notifier.async_notify(body=SUMMARY, title=TITLE)
        else:
            result = await asyncio.to_thread(notifier.notify, body=SUMMARY, title=TITLE)
        return {"notify_ok": bool(result)}

    measured = await _timed(run)
    return {
        **measured,
        "add_seconds": add_seconds,
        "version": apprise.__version__,
        "ok": measured["notify_ok"],
    }


async def measure_aiohttp(port: int, n: int, concurrency: int, body_bytes: int) -> dict[str, Any]:
    import aiohttp

    # A JSON body of the webhook body's size, and the webhook's headers.
    filler = "x" * max(0, body_bytes - len('{"type":"incident.update","text":""}'))
    body = json.dumps({"type": "incident.update", "text": filler}, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))

    async def run() -> dict[str, Any]:
        semaphore = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            connector=aiohttp.TCPConnector(limit=concurrency),
        ) as session:

            async def post(i: int) -> bool:
                async with semaphore:
                    headers = {
                        "Content-Type": "application/json",
                        "webhook-id": f"{i:032x}",
                        "webhook-timestamp": timestamp,
                    }
                    async with session.post(
                        f"http://127.0.0.1:{port}/t/{i}", data=body, headers=headers
                    ) as response:
                        await response.read()
                        return response.status == 200

            results = await asyncio.gather(*(post(i) for i in range(n)), return_exceptions=True)
        return {"delivered": sum(r is True for r in results)}

    measured = await _timed(run)
    return {**measured, "body_bytes": len(body), "ok": measured["delivered"] == n}


def loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def worker_main(args: argparse.Namespace) -> None:
    """One contender, in this (fresh) process; prints one RESULT line."""
    if args.worker == "broadcaster":
        job = measure_broadcaster(args.port, args.n, args.concurrency)
    elif args.worker == "apprise":
        job = measure_apprise(args.port, args.n, args.apprise_mode)
    else:
        job = measure_aiohttp(args.port, args.n, args.concurrency, args.body_bytes)

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(job, timeout=args.timeout)

    try:
        # Every contender runs on the loop the broadcaster CLI uses (uvloop where it is
        # installed), so the ratios compare code, not event loops.
        result = run_loop(bounded())
    except TimeoutError:
        result = {"ok": False, "error": f"not finished within {args.timeout:.0f}s"}
    result["peak_rss_mb"] = _peak_rss_mb()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    # Do not wait for worker threads a timed-out run may have left (Apprise's pool).
    os._exit(0)


# -- orchestrating ------------------------------------------------------------------------


@dataclass
class Sink:
    process: subprocess.Popen[bytes]
    port: int

    def stats(self) -> dict[str, int]:
        """Totals since the sink started: POSTs, body bytes, TCP connections accepted."""
        url = f"http://127.0.0.1:{self.port}/_stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            stats: dict[str, int] = json.loads(response.read())
        return stats

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


@contextlib.contextmanager
def running_sink(kind: str) -> Iterator[Sink]:
    """The sink in its own process; always terminated (and it exits if we die)."""
    process = subprocess.Popen(
        [sys.executable, str(SINK), "--kind", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20)
        line = process.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"the sink did not start (said {line!r})")
        yield Sink(process, int(line.split()[1]))
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have used (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(
    contender: str, sink: Sink, n: int, timeout: float, extra: list[str]
) -> dict[str, Any]:
    """Run one contender in a fresh process; add the sink's view of the run."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        contender,
        "--port",
        str(sink.port),
        "-n",
        str(n),
        "--timeout",
        str(timeout),
        *extra,
    ]
    try:
        before, sink_cpu = sink.stats(), sink.cpu_seconds()
        busy, children, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"no result within {timeout + 30:.0f}s", "n": n}
        wall = time.perf_counter() - wall
        sink_cpu = sink.cpu_seconds() - sink_cpu
        # CPU that neither the worker nor the sink used while the worker ran: other work
        # on this machine competing with the measurement.
        others = _busy_cpu_seconds() - busy - (_children_cpu_seconds() - children) - sink_cpu
        after = sink.stats()
    except Exception as exc:  # the sink died or stopped answering
        return {"ok": False, "error": f"sink: {type(exc).__name__}: {exc}", "n": n}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"ok": False, "error": f"exit {done.returncode}: {tail}", "n": n}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["n"] = n
    if "seconds" not in result:
        return result
    received = after["posts"] - before["posts"]
    result.update(
        per_s=n / result["seconds"],
        sink_received=received,
        sink_body_bytes=(after["bytes"] - before["bytes"]) / received if received else 0,
        # minus the connection of our own `GET /_stats` after the run
        sink_connections=after["connections"] - before["connections"] - 1,
        sink_cpu_percent=100 * sink_cpu / result["seconds"],  # it idles outside that
        others_cpu_percent=max(0.0, 100 * others / wall),
    )
    if received != n:
        result["ok"] = False
        result["error"] = f"the sink received {received} POSTs, expected {n}"
    elif not result["ok"]:
        result["error"] = "not every delivery succeeded: " + json.dumps(
            {k: v for k, v in result.items() if k in ("states", "delivered", "notify_ok")}
        )
    return result


def time_help(runs: int = 10) -> float:
    """Median wall time of `broadcaster --help`, in ms, after one warm-up."""
    script = Path(sys.executable).with_name("broadcaster")
    command = (
        [str(script), "--help"]
        if script.exists()
        else [sys.executable, "-m", "broadcaster.cli", "--help"]
    )
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, timeout=60)
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by rate (the runs' rates are kept in `runs_per_s`)."""
    ordered = sorted(results, key=lambda r: r.get("per_s", 0.0))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_per_s"] = [round(r.get("per_s", 0.0), 1) for r in results]
    chosen["ok"] = all(r.get("ok") for r in results)
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        chosen["error"] = errors[0]
    return chosen


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Fan-out of one update to N webhook targets: incident-broadcaster vs "
        "Apprise vs bare aiohttp, on a loopback sink."
    )
    parser.add_argument("-n", type=int, default=10_000, help="targets (default 10000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=WebhookChannel.default_concurrency,
        help="broadcaster and aiohttp (default: the webhook adapter's, "
        f"{WebhookChannel.default_concurrency})",
    )
    parser.add_argument(
        "--apprise-n",
        type=int,
        default=None,
        help="targets for Apprise (default: min(N, 2000): Apprise is slow; rates compare)",
    )
    parser.add_argument("--apprise-mode", choices=["async", "sync"], default="async")
    parser.add_argument("--sink", choices=["aiohttp", "raw"], default="aiohttp")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (median)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument(
        "--only",
        choices=["broadcaster", "apprise", "aiohttp"],
        action="append",
        help="run only these contenders (repeatable)",
    )
    parser.add_argument("--no-help-timing", action="store_true")
    parser.add_argument("--json", action="store_true", help="print a JSON line last")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    # Internal: run one contender in this process.
    hidden = argparse.SUPPRESS
    parser.add_argument("--worker", choices=["broadcaster", "apprise", "aiohttp"], help=hidden)
    parser.add_argument("--port", type=int, default=0, help=hidden)
    parser.add_argument("--body-bytes", type=int, default=700, help=hidden)
    args = parser.parse_args()

    if args.worker:
        worker_main(args)
        return 0

    # On SIGTERM too, unwind: the running worker is killed and the sink terminated.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    n = args.n
    apprise_n = args.apprise_n or min(n, 2000)
    load_before = os.getloadavg()[0]
    contenders = args.only or ["broadcaster", "apprise", "aiohttp"]
    results: dict[str, dict[str, Any]] = {}
    with running_sink(args.sink) as sink:
        for contender in contenders:
            runs = []
            for _ in range(args.repeat):
                if contender == "broadcaster":
                    extra = ["--concurrency", str(args.concurrency)]
                    runs.append(run_worker(contender, sink, n, args.timeout, extra))
                elif contender == "apprise":
                    extra = ["--apprise-mode", args.apprise_mode]
                    runs.append(run_worker(contender, sink, apprise_n, args.timeout, extra))
                else:
                    body = results.get("broadcaster", {}).get("sink_body_bytes") or 700
                    extra = [
                        "--concurrency",
                        str(args.concurrency),
                        "--body-bytes",
                        str(round(body)),
                    ]
                    runs.append(run_worker(contender, sink, n, args.timeout, extra))
            results[contender] = median_run(runs)
    help_ms = None
    if not args.no_help_timing:
        try:
            help_ms = time_help()
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"  ! broadcaster --help failed: {exc}")
    load_after = os.getloadavg()[0]

    def rate(name: str) -> float | None:
        result = results.get(name)
        return result["per_s"] if result and result.get("ok") else None

    b_rate, a_rate, h_rate = rate("broadcaster"), rate("apprise"), rate("aiohttp")
    over_apprise = b_rate / a_rate if b_rate and a_rate else None
    over_aiohttp = b_rate / h_rate if b_rate and h_rate else None

    print(
        f"Fan-out of one update to N webhook targets — {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, event loop: {loop_name()}, "
        f"sink: {args.sink} in its own process on 127.0.0.1:{sink.port}"
    )
    header = (
        f"{'contender':<34}{'N':>7}{'seconds':>9}{'deliv/s':>10}"
        f"{'CPU %':>7}{'sink CPU %':>11}{'others %':>9}{'conns':>7}{'peak RSS MB':>13}  ok"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "broadcaster": f"incident-broadcaster (c={args.concurrency})",
        "apprise": "Apprise {} ({})".format(
            results.get("apprise", {}).get("version", ""),
            "async_notify" if args.apprise_mode == "async" else "notify",
        ),
        "aiohttp": f"bare aiohttp (c={args.concurrency})",
    }
    for name, result in results.items():
        if "per_s" not in result:
            print(f"{labels[name]:<34}{result['n']:>7}  FAILED: {result.get('error')}")
            continue
        print(
            f"{labels[name]:<34}{result['n']:>7}{result['seconds']:>9.2f}"
            f"{result['per_s']:>10,.0f}{result['cpu_percent']:>7.0f}"
            f"{result['sink_cpu_percent']:>11.0f}{result['others_cpu_percent']:>9.0f}"
            f"{result['sink_connections']:>7}"
            f"{result['peak_rss_mb']:>13.1f}"
            f"  {'yes' if result['ok'] else 'NO'}"
        )
        if not result["ok"]:
            print(f"    ! {result.get('error')}")
    busiest = max((r.get("others_cpu_percent", 0.0) for r in results.values()), default=0.0)
    if busiest > 15:
        print(
            f"  note: other processes used up to {busiest:.0f}% CPU (100% = one core) during "
            "the runs — the figures are lower than on an idle machine; use --repeat 3"
        )
    if args.repeat > 1:
        for name, result in results.items():
            print(f"  {name} runs (deliveries/s): {result.get('runs_per_s')}")
    if "broadcaster" in results and "per_s" in results["broadcaster"]:
        r = results["broadcaster"]
        print(
            f"  broadcaster: publish() {r['publish_seconds'] * 1000:.0f} ms of the "
            f"{r['seconds']:.2f} s; open() {r['open_seconds']:.2f} s (not timed); "
            f"states {r['states']}; {r['sink_body_bytes']:.0f}-byte bodies"
        )
    if "apprise" in results and "add_seconds" in results["apprise"]:
        r = results["apprise"]
        print(f"  apprise: add() of {r['n']} URLs {r['add_seconds']:.2f} s (not timed)")
    if apprise_n != n and "apprise" in results:
        print(f"  Apprise measured on N={apprise_n} (it is slow); deliveries/s compare.")

    checks = [
        ("tracked deliveries/s", b_rate, TARGET_PER_S, f"{b_rate or 0:,.0f}", "≥ 3,000"),
        (
            "broadcaster / Apprise",
            over_apprise,
            TARGET_OVER_APPRISE,
            fmt_ratio(over_apprise),
            "≥ 4.5x",
        ),
        (
            "broadcaster / bare aiohttp",
            over_aiohttp,
            TARGET_OVER_AIOHTTP,
            fmt_ratio(over_aiohttp),
            "≥ 0.5x",
        ),
    ]
    print()
    print(f"{'measure':<30}{'value':>12}  {'target':<10}")
    passed: dict[str, bool | None] = {}
    for label, value, target, shown, target_text in checks:
        ok = None if value is None else value >= target
        passed[label] = ok
        mark = "n/a" if ok is None else ("PASS" if ok else "MISS")
        print(f"{label:<30}{shown:>12}  {target_text:<10}{mark}")
    if help_ms is not None:
        ok = help_ms <= TARGET_HELP_MS
        passed["broadcaster --help ms"] = ok
        print(
            f"{'broadcaster --help (median)':<30}{help_ms:>10.0f}ms  {'≤ 250 ms':<10}"
            f"{'PASS' if ok else 'MISS'}"
        )
    b_rss = results.get("broadcaster", {}).get("peak_rss_mb")
    if b_rss is not None:
        print(f"{'broadcaster peak RSS':<30}{b_rss:>10.1f}MB")

    if args.json:
        summary = {
            "n": n,
            "apprise_n": apprise_n,
            "concurrency": args.concurrency,
            "sink": args.sink,
            "apprise_mode": args.apprise_mode,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": [round(load_before, 2), round(load_after, 2)],
            "broadcaster_per_s": b_rate,
            "apprise_per_s": a_rate,
            "aiohttp_per_s": h_rate,
            "help_ms": help_ms,
            "peak_rss_mb": b_rss,
            "ratios": {
                "broadcaster_over_apprise": over_apprise,
                "broadcaster_over_aiohttp": over_aiohttp,
            },
            "targets": {
                "per_s": TARGET_PER_S,
                "over_apprise": TARGET_OVER_APPRISE,
                "over_aiohttp": TARGET_OVER_AIOHTTP,
                "help_ms": TARGET_HELP_MS,
            },
            "passed": passed,
            "results": results,
        }
        print(json.dumps(summary))
    if not all(r.get("ok") for r in results.values()):
        return 1
    if args.strict and not all(passed.values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
