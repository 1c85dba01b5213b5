"""Load from ``wrk`` and what the server paid for it, read from /proc.

The load generator must cost the server nothing it would not pay in production: ``wrk``
(C, epoll, one thread for every connection) writes the requests, a small Lua script makes
each request's body (a fresh idempotency key where the endpoint stores one), and the
figures that count are read from the kernel, not from the generator:

- the server's CPU time (utime + stime of every process of the server, /proc/<pid>/stat:
  exited threads included) divided by the requests answered: CPU per request;
- the run-queue wait of the server's threads (/proc/<pid>/task/*/schedstat, second field):
  time the server was ready to run but another process had the CPU. A closed-loop latency
  on a shared machine is this wait plus the service time, so it is printed beside every
  latency;
- CPU pressure (/proc/pressure/cpu, ``some``): the share of the window in which at least one
  runnable task of the machine waited for a CPU; and the load average before and after.

``wrk`` comes from Debian's package (``make bench`` installs it with
scripts/ensure-system-deps.sh bench).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads, the exited ones too), in seconds."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_waits_ns(pid: int) -> dict[int, int]:
    """Run-queue wait (ns) of each live thread of a process."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if text:
            out[int(tid)] = int(text.split()[1])
    return out


def psi_some_us() -> int | None:
    """Total µs during which some runnable task waited for a CPU (None: no PSI)."""
    text = _read("/proc/pressure/cpu")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("some"):
            return int(line.rsplit("total=", 1)[1])
    return None


@dataclass
class Snapshot:
    at: float
    cpu_s: dict[int, float]
    waits_ns: dict[int, dict[int, int]]
    psi_us: int | None
    load: float
    children_cpu_s: float


def snapshot(pids: Sequence[int]) -> Snapshot:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Snapshot(
        at=time.monotonic(), cpu_s={p: process_cpu_s(p) for p in pids},
        waits_ns={p: thread_waits_ns(p) for p in pids}, psi_us=psi_some_us(),
        load=os.getloadavg()[0], children_cpu_s=usage.ru_utime + usage.ru_stime)


@dataclass
class Window:
    """What happened between two snapshots."""

    wall_s: float
    server_cpu_s: float
    server_runq_wait_s: float
    psi_some_share: float | None
    load_before: float
    load_after: float
    generator_cpu_s: float  # reaped children (the wrk run) between the two snapshots


def window(before: Snapshot, after: Snapshot) -> Window:
    wall = after.at - before.at
    cpu = sum(after.cpu_s[p] - before.cpu_s.get(p, 0.0) for p in after.cpu_s)
    wait = 0
    for pid, threads in after.waits_ns.items():
        earlier = before.waits_ns.get(pid, {})
        wait += sum(ns - earlier.get(tid, 0) for tid, ns in threads.items())
    psi = None
    if before.psi_us is not None and after.psi_us is not None and wall > 0:
        psi = (after.psi_us - before.psi_us) / 1e6 / wall
    return Window(wall, cpu, wait / 1e9, psi, before.load, after.load,
                  after.children_cpu_s - before.children_cpu_s)


WRK_SCRIPT = r"""
-- one table per device: the request's path, headers, and the body around its key
local devices = {DEVICES}
local path = "{PATH}"
local prefix = "{PREFIX}"
local n = 0
statuses = {}  -- per thread (global: done() reads it through thread:get)
local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

local keys = 0
local out = {}

request = function()
  n = n + 1
  local d = devices[(n % #devices) + 1]
  local parts = d.parts
  local body = parts[1]
  if #parts > 1 then  -- a fresh key between every two parts
    out[1] = parts[1]
    for i = 2, #parts do
      keys = keys + 1
      out[2 * i - 2] = string.format("%s%012x", prefix, keys)
      out[2 * i - 1] = parts[i]
    end
    body = table.concat(out, "", 1, 2 * #parts - 1)
  end
  return wrk.format("POST", path, d.headers, body)
end

response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

done = function(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for code, count in pairs(thread:get("statuses") or {}) do
      total[code] = (total[code] or 0) + count
    end
  end
  local codes = {}
  for code, count in pairs(total) do
    codes[#codes + 1] = string.format('"%d": %d', code, count)
  end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, "non_2xx": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"mean_us": %.1f, "statuses": {%s}}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.errors.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean, table.concat(codes, ", ")))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


@dataclass
class Target:
    """One kind of request: for each device its headers and body. Every KEY in a body is
    replaced by a fresh idempotency key (a UUID) on every request."""

    path: str
    bodies: list[tuple[dict[str, str], str]] = field(default_factory=list)


KEY = "@KEY@"


def wrk_script(target: Target, key_prefix: str) -> str:
    entries = []
    for headers, body in target.bodies:
        head = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
        parts = ", ".join(_lua_string(part) for part in body.split(KEY))
        entries.append(f"{{headers = {{{head}}}, parts = {{{parts}}}}}")
    return (WRK_SCRIPT.replace("{DEVICES}", "{" + ",\n".join(entries) + "}")
            .replace("{PATH}", target.path).replace("{PREFIX}", key_prefix))


WRK_MISSING = "wrk is not installed (scripts/ensure-system-deps.sh bench)"


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def key_prefix() -> str:
    """A random start for a run's keys: "xxxxxxxx-xxxx-4xxx-8" (a version-4 UUID's)."""
    raw = secrets.token_hex(8)
    return f"{raw[:8]}-{raw[8:12]}-4{raw[12:15]}-8"


def run_wrk(base: str, target: Target, connections: int, seconds: float,
            key_prefix: str) -> dict[str, Any]:
    """``wrk -t1 -c<connections>`` for ``seconds``; its Lua summary as a dict.
    ``key_prefix``: the first 20 characters of every key this run makes ("xxxxxxxx-xxxx-4xxx-
    8xxx-"): different for every run, so no request repeats an earlier run's key."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text(wrk_script(target, key_prefix))
        done = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             "--timeout", "30s", "-s", str(script), base + target.path],
            capture_output=True, text=True, timeout=seconds + 120, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])  # type: ignore[no-any-return]
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} "
                       f"{done.stderr[-500:]}")


def measure(base: str, target: Target, pids: Sequence[int], connections: int,
            warmup_s: float, seconds: float, key_prefix: str,
            extra_cpu: Callable[[], float] | None = None,
            counters: dict[str, Callable[[], float]] | None = None) -> dict[str, Any]:
    """A warm-up run (not counted), then a counted run with the server's CPU, run-queue wait,
    CPU pressure and load average around it. ``extra_cpu``: a callable returning other
    processes' CPU seconds (e.g. the database's), reported per request too; ``counters``:
    name -> callable, reported as the difference over the counted run."""
    if warmup_s > 0:
        run_wrk(base, target, connections, warmup_s, _next_prefix(key_prefix, 0))
    counted0 = {name: read() for name, read in (counters or {}).items()}
    extra0 = extra_cpu() if extra_cpu is not None else None
    before = snapshot(pids)
    result = run_wrk(base, target, connections, seconds, _next_prefix(key_prefix, 1))
    after = snapshot(pids)
    win = window(before, after)
    answered = max(1, result["requests"])
    out: dict[str, Any] = {
        "connections": connections,
        "requests": result["requests"],
        "requests_per_s": round(result["requests"] / (result["duration_us"] / 1e6), 1),
        "statuses": result["statuses"],
        "errors": {k: result[k] for k in ("connect_errors", "read_errors", "write_errors",
                                          "timeouts", "non_2xx") if result[k]},
        "server_cpu_ms_per_request": round(win.server_cpu_s * 1000 / answered, 3),
        "latency_ms": {k[:-3] + "_ms": round(result[k] / 1000, 2)
                       for k in ("p50_us", "p90_us", "p95_us", "p99_us", "max_us")},
        "server_cpu_share_of_one_core": round(win.server_cpu_s / win.wall_s, 2),
        "server_runq_wait_ms_per_request": round(win.server_runq_wait_s * 1000 / answered,
                                                 3),
        "server_runq_wait_share": round(win.server_runq_wait_s / win.wall_s, 2),
        "cpu_pressure_some_share": None if win.psi_some_share is None
        else round(win.psi_some_share, 2),
        "generator_cpu_ms_per_request": round(win.generator_cpu_s * 1000 / answered, 3),
        "load_avg_1m_before_after": [round(win.load_before, 2), round(win.load_after, 2)],
    }
    if extra_cpu is not None and extra0 is not None:
        out["database_cpu_ms_per_request"] = round(
            (extra_cpu() - extra0) * 1000 / answered, 3)
    for name, read in (counters or {}).items():
        out[name] = read() - counted0[name]
    return out


def _next_prefix(prefix: str, run: int) -> str:
    """``prefix`` ("xxxxxxxx-xxxx-4xxx-8") with the run number in its last 3 digits."""
    return f"{prefix}{run:03x}-"
