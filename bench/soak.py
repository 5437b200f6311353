#!/usr/bin/env python3
"""Soak test: portcullis under mixed load for a long time, sampled once a minute.

Starts a local origin and `portcullis serve` with a generated config on loopback addresses of
its own (a closed pool, an open pool whose site is in reject mode, metrics and admin), then
applies, for the whole run:

- steady HTTPS keep-alive requests (wrk, paced by a Lua delay) to the closed pool's site;
- new TLS connections (wrk with Connection: close) to the open pool's site;
- cleartext requests carrying an X-API-Key on the open pool's cleartext port (expects 403),
  and now and then cleartext sent to a TLS port (expects 400);
- slow clients sending a request head one byte per second, over TLS and in cleartext
  (expects the edge to cut them at header_read_timeout);
- silent clients: TCP connect to a TLS port and nothing; TLS handshake and nothing; HTTP/2
  (ALPN h2) without the connection preface (expects the edge to close them);
- silent TCP and TLS connections to the admin and metrics ports.

Every minute it prints one row: RSS and open descriptors of the portcullis process, active
connections and handshake/refusal counters from /metrics, wrk's requests and errors in that
minute, and the load clients' errors. At the end it prints the table again, the change of RSS
and descriptors, and whether they stayed flat. Exit status: 0 flat, 1 not flat or client
errors, 2 portcullis died or did not start.

Without wrk (or without root, which /etc/hosts needs so that wrk sends the site's name as SNI),
Python threads send the keep-alive and new-connection load instead.
"""

import argparse
import asyncio
import ctypes
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "portcullis")
HOSTS_MARK = "# portcullis-soak"
TLS_PORT, CLEAR_PORT, METRICS_PORT, ADMIN_PORT, ORIGIN_PORT = 8443, 8080, 9464, 9443, 18081
CLOSED_HOST, OPEN_HOST = "api.soak.test", "legacy.soak.test"
# Edge timeouts of the generated config; the clients' expectations follow from them.
HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT = 5, 5, 20
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0.0.0 Safari/537.36")
ORIGIN_BODY = b"hello from the soak origin\n"


# ---------------------------------------------------------------------------------------------
# The origin: a small asyncio HTTP/1.1 server (keep-alive, fixed body), run as a child process.

async def _origin_conn(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(ORIGIN_BODY)).encode() + b"\r\n\r\n" + ORIGIN_BODY)
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def run_origin(addr):
    host, port = addr.rsplit(":", 1)

    async def main():
        server = await asyncio.start_server(_origin_conn, host, int(port), backlog=1024)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------------------------
# Children and cleanup.

_libc = ctypes.CDLL(None, use_errno=True)
CHILDREN = []


def _die_with_parent():
    # PR_SET_PDEATHSIG: a child gets SIGTERM if this script dies without cleaning up.
    _libc.prctl(1, signal.SIGTERM)


def spawn(cmd, orphan_safe=False, **kw):
    """Starts a child and records it for cleanup. `orphan_safe` (before any thread starts:
    preexec_fn is not safe with threads) also has it killed if this script dies."""
    p = subprocess.Popen(cmd, preexec_fn=_die_with_parent if orphan_safe else None, **kw)
    CHILDREN.append(p)
    return p


def stop_children():
    for p in CHILDREN:
        if p.poll() is None:
            p.terminate()
    for p in CHILDREN:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def hosts_lines(add):
    with open("/etc/hosts") as f:
        lines = [l for l in f.read().splitlines() if HOSTS_MARK not in l]
    lines += add
    with open("/etc/hosts", "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Sampling.

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+([0-9.eE+-]+|NaN)")


def scrape(url, ctx):
    """{(name, frozenset(labels)): value} from /metrics."""
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
            out[(m.group(1), labels)] = float(m.group(4))
    return out


def msum(metrics, name, **want):
    return sum(v for (n, labels), v in metrics.items()
               if n == name and all((k, w) in labels for k, w in want.items()))


def metric_figures(m):
    return {
        "active": msum(m, "portcullis_active_connections"),
        "hs_timeout": msum(m, "portcullis_handshake_failures_total", reason="timeout"),
        "hs_failed": msum(m, "portcullis_handshake_failures_total") -
        msum(m, "portcullis_handshake_failures_total", reason="timeout"),
        "refused": msum(m, "portcullis_requests_total", scheme="cleartext", status="4xx")
        + msum(m, "portcullis_cleartext_on_tls_port_total"),
    }


# ---------------------------------------------------------------------------------------------
# Load clients. Each runs in a thread until STOP; every outcome is counted in STATS.

STOP = threading.Event()
LOCK = threading.Lock()


class Kind:
    """Counts for one kind of client: connections, server closes and when, errors."""

    def __init__(self, name, bound, strict):
        self.name, self.bound, self.strict = name, bound, strict
        self.conns = self.closed = self.held = self.errors = self.ok = 0
        self.close_times = []


KINDS = {}
ERRORS = {"total": 0, "examples": {}}
STEADY = {"req": 0, "err": 0, "new": 0}


def error(kind, what):
    with LOCK:
        kind.errors += 1
        ERRORS["total"] += 1
        key = f"{kind.name}: {what}"
        ERRORS["examples"][key] = ERRORS["examples"].get(key, 0) + 1


def tcp(addr, port, timeout=5):
    return socket.create_connection((addr, port), timeout=timeout)


def tls(ctx, addr, port, sni, alpn):
    c = ctx[alpn]
    s = tcp(addr, port)
    try:
        return c.wrap_socket(s, server_hostname=sni)
    except BaseException:
        s.close()
        raise


def read_response(sock, limit=65536):
    """Status code of one HTTP/1.1 response (body by Content-Length), or None on EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None, buf
        buf += chunk
        if len(buf) > limit:
            raise ValueError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    need = int(m.group(1)) if m else 0
    while len(rest) < need:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    return status, rest[need:]


def wait_closed(kind, sock, started, cap):
    """Waits for the server to close a connection we keep silent; counts the outcome."""
    sock.settimeout(0.5)
    while not STOP.is_set():
        if time.monotonic() - started > cap:
            with LOCK:
                kind.held += 1
            if kind.strict:
                error(kind, f"server kept a silent connection past {cap:.0f}s")
            return
        try:
            if sock.recv(4096):
                continue  # an h2 server's SETTINGS, a 408: wait for the close itself
        except (socket.timeout, ssl.SSLWantReadError):
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        # EOF or a reset: the server closed the silent connection.
        with LOCK:
            kind.closed += 1
            kind.close_times.append(time.monotonic() - started)
        return


def silent_loop(kind, connect, cap):
    while not STOP.is_set():
        started = time.monotonic()
        try:
            sock = connect()
        except (OSError, ssl.SSLError) as e:
            error(kind, f"connect: {type(e).__name__}: {e}")
            STOP.wait(1)
            continue
        with LOCK:
            kind.conns += 1
        try:
            wait_closed(kind, sock, started, cap)
        finally:
            sock.close()


def slow_loop(kind, connect, head):
    """Sends `head` one byte per second; the server should cut the connection first."""
    while not STOP.is_set():
        started = time.monotonic()
        try:
            sock = connect()
        except (OSError, ssl.SSLError) as e:
            error(kind, f"connect: {type(e).__name__}: {e}")
            STOP.wait(1)
            continue
        with LOCK:
            kind.conns += 1
        try:
            sock.settimeout(1.0)
            cut = None
            for i in range(len(head)):
                if STOP.is_set():
                    return
                try:
                    sock.sendall(head[i:i + 1])
                    data = sock.recv(4096)  # waits at most a second: the pace
                except (socket.timeout, ssl.SSLWantReadError):
                    continue
                except (ConnectionError, ssl.SSLError, OSError):
                    data = b""
                # EOF, a reset or an answer before the head was complete (408): cut. An
                # answer to the whole head means the server waited for every byte.
                cut = i < len(head) - 1 or not data.startswith(b"HTTP/1.1 2")
                break
            if cut:
                with LOCK:
                    kind.closed += 1
                    kind.close_times.append(time.monotonic() - started)
            else:
                with LOCK:
                    kind.held += 1
                error(kind, f"whole head sent at one byte/s ({len(head)}s) without being cut")
        finally:
            sock.close()


def cleartext_loop(kind, open_addr, pace):
    """Cleartext requests with an X-API-Key to the reject site (403), and every tenth one to
    the TLS port (400). A small set of keys, so the exposure records stay few."""
    i = 0
    while not STOP.is_set():
        i += 1
        port, want = (TLS_PORT, 400) if i % 10 == 0 else (CLEAR_PORT, 403)
        req = (f"GET /v1/items/{i % 50}?page=2 HTTP/1.1\r\nHost: {OPEN_HOST}\r\n"
               f"X-API-Key: soak-legacy-key-{i % 8:02d}\r\nUser-Agent: {USER_AGENT}\r\n"
               f"Connection: close\r\n\r\n").encode()
        try:
            with tcp(open_addr, port) as s:
                with LOCK:
                    kind.conns += 1
                s.sendall(req)
                status, _ = read_response(s)
            if status != want:
                error(kind, f"port {port}: status {status}, expected {want}")
            else:
                with LOCK:
                    kind.ok += 1
        except (OSError, ValueError) as e:
            error(kind, f"port {port}: {type(e).__name__}: {e}")
        STOP.wait(pace)


def closed_cleartext_loop(kind, closed_addr, pace):
    """A cleartext connect to the closed pool: the kernel must refuse it."""
    while not STOP.is_set():
        with LOCK:
            kind.conns += 1
        try:
            tcp(closed_addr, CLEAR_PORT, timeout=2).close()
            error(kind, f"cleartext connect to the closed pool {closed_addr}:{CLEAR_PORT} accepted")
        except ConnectionRefusedError:
            with LOCK:
                kind.ok += 1
        except OSError as e:
            error(kind, f"{type(e).__name__}: {e}")
        STOP.wait(pace)


def steady_loop(ctx, addr, sni, keep_alive, delay):
    """The Python stand-in for wrk: GETs over TLS, one connection or one per request."""
    sock = None
    req = (f"GET / HTTP/1.1\r\nHost: {sni}\r\nUser-Agent: {USER_AGENT}\r\n"
           + ("" if keep_alive else "Connection: close\r\n") + "\r\n").encode()
    while not STOP.is_set():
        try:
            if sock is None:
                sock = tls(ctx, addr, TLS_PORT, sni, "http/1.1")
                sock.settimeout(5)
            sock.sendall(req)
            status, _ = read_response(sock)
            with LOCK:
                if status == 200:
                    STEADY["new" if not keep_alive else "req"] += 1
                else:
                    STEADY["err"] += 1
            if not keep_alive or status is None:
                sock.close()
                sock = None
        except (OSError, ssl.SSLError, ValueError):
            with LOCK:
                STEADY["err"] += 1
            if sock is not None:
                sock.close()
            sock = None
            STOP.wait(0.5)
        STOP.wait(delay)
    if sock is not None:
        sock.close()


def start_clients(args, ctx, addrs):
    closed, open_, svc = addrs
    edge_silent = HANDSHAKE_TIMEOUT + 5
    after_hs = max(HEADER_TIMEOUT, IDLE_TIMEOUT * 1.25) + 5
    threads = []

    def kind(name, bound, strict=True):
        KINDS[name] = Kind(name, bound, strict)
        return KINDS[name]

    def go(fn, *a):
        t = threading.Thread(target=fn, args=a, daemon=True)
        t.start()
        threads.append(t)

    k = kind("cleartext X-API-Key (403) / to TLS port (400)", None)
    for _ in range(2):
        go(cleartext_loop, k, open_, 0.2)
    go(closed_cleartext_loop, kind("cleartext to the closed pool (refused)", None), closed, 1.0)

    head = (f"GET /slow HTTP/1.1\r\nHost: {CLOSED_HOST}\r\nUser-Agent: soak-slow\r\n"
            f"X-Padding: {'x' * 20}\r\n\r\n").encode()
    clear_head = head.replace(CLOSED_HOST.encode(), OPEN_HOST.encode())
    k = kind("slow head over TLS", HEADER_TIMEOUT + 5)
    for _ in range(args.slow):
        go(slow_loop, k, lambda: tls(ctx, closed, TLS_PORT, CLOSED_HOST, "http/1.1"), head)
    k = kind("slow head in cleartext", HEADER_TIMEOUT + 5)
    for _ in range(args.slow):
        go(slow_loop, k, lambda: tcp(open_, CLEAR_PORT), clear_head)

    for addr, name in ((closed, "closed"), (open_, "open")):
        k = kind(f"silent TCP, {name} TLS port", edge_silent)
        sni = CLOSED_HOST if name == "closed" else OPEN_HOST
        for _ in range(args.silent):
            go(silent_loop, k, lambda a=addr: tcp(a, TLS_PORT), edge_silent)
        k = kind(f"silent after TLS, {name} pool", after_hs)
        for _ in range(args.silent):
            go(silent_loop, k, lambda a=addr, s=sni: tls(ctx, a, TLS_PORT, s, "http/1.1"), after_hs)
        k = kind(f"h2 without preface, {name} pool", after_hs)
        for _ in range(args.silent):
            go(silent_loop, k, lambda a=addr, s=sni: tls(ctx, a, TLS_PORT, s, "h2"), after_hs)

    # The admin and metrics listeners promise no timeout after the handshake: a connection
    # they keep is counted as held (not an error) and given up after a minute.
    for port, name in ((ADMIN_PORT, "admin"), (METRICS_PORT, "metrics")):
        k = kind(f"silent TCP, {name} port", 60, strict=False)
        go(silent_loop, k, lambda p=port: tcp(svc, p), 60)
        k = kind(f"silent after TLS, {name} port", 60, strict=False)
        go(silent_loop, k, lambda p=port: tls(ctx, svc, p, svc, "http/1.1"), 60)

    if not args.use_wrk:
        for _ in range(args.conns):
            go(steady_loop, ctx, closed, CLOSED_HOST, True, args.delay_ms / 1000)
        for _ in range(args.new_conns):
            go(steady_loop, ctx, open_, OPEN_HOST, False, args.new_delay_ms / 1000)
    return threads


# ---------------------------------------------------------------------------------------------
# wrk.

def start_wrk(args, d, seconds):
    procs = []
    for url, conns, delay, extra, name in (
            (f"https://{CLOSED_HOST}:{TLS_PORT}/", args.conns, args.delay_ms, (), "keepalive"),
            (f"https://{OPEN_HOST}:{TLS_PORT}/", args.new_conns, args.new_delay_ms,
             ("-H", "Connection: close"), "newconn")):
        script = os.path.join(d, f"wrk-{name}.lua")
        with open(script, "w") as f:
            f.write(f"function delay() return {delay} end\n")
        out = open(os.path.join(d, f"wrk-{name}.out"), "w+")
        p = spawn(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
                   "-H", f"User-Agent: {USER_AGENT}", *extra, url],
                  stdout=out, stderr=subprocess.STDOUT)
        procs.append((name, p, out))
    return procs


def wrk_result(out):
    out.seek(0)
    text = out.read()
    m = re.search(r"(\d+) requests in", text)
    total = int(m.group(1)) if m else 0
    errors = 0 if m else 1
    s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if s:
        errors += sum(int(x) for x in s.groups())
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if n:
        errors += int(n.group(1))
    return total, errors


# ---------------------------------------------------------------------------------------------
# The table.

COLS = [("min", 4), ("rss KiB", 9), ("fds", 5), ("active", 7), ("hs tmo", 7), ("hs fail", 8),
        ("refused", 8), ("wrk req", 9), ("wrk new", 8), ("wrk err", 8), ("cli err", 8)]


def header():
    return " ".join(f"{n:>{w}}" for n, w in COLS)


def fmt(row):
    keys = ["min", "rss", "fds", "active", "hs_timeout", "hs_failed", "refused", "req", "new",
            "werr", "cerr"]
    return " ".join(f"{row.get(k, '-')!s:>{w}}" for k, (_, w) in zip(keys, COLS))


def flat(series, rows, warm, tol, slack):
    """(verdict line, is_flat) for a sampled series after the warm-up minutes."""
    first, base, last = rows[0][series], rows[warm][series], rows[-1][series]
    peak = max(r[series] for r in rows[warm:])
    change = (last - base) / base * 100 if base else 0.0
    ok = abs(last - base) <= max(base * tol, slack) and peak <= max(base * (1 + tol), base + slack)
    line = (f"{first} at start -> {last} at the end ({last - first:+d}); after warm-up "
            f"(minute {rows[warm]['min']}) {base} -> {last} ({change:+.1f}%), peak {peak}")
    xs = [r["min"] for r in rows[warm:]]
    if len(xs) >= 3:
        ys = [r[series] for r in rows[warm:]]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        line += f", trend {slope * 60:+.0f}/hour"
    return line, ok


def kinds_report():
    lines = []
    for k in KINDS.values():
        if k.close_times:
            t = sorted(k.close_times)
            closes = f"closed by the server {k.closed}x after {statistics.median(t):.1f}s median, {t[-1]:.1f}s max"
        elif k.bound is not None:
            closes = "never closed by the server"
        else:
            closes = f"{k.ok} as expected"
        held = f", held past {k.bound}s {k.held}x" if k.held else ""
        lines.append(f"  {k.name}: {k.conns} connections, {closes}{held}, {k.errors} errors")
    return lines


# ---------------------------------------------------------------------------------------------

def write_config(d, addrs, workers):
    closed, open_, svc = addrs
    path = os.path.join(d, "soak.toml")
    with open(path, "w") as f:
        f.write(f"""# generated by bench/soak.py
[state]
dir = "{d}/state"

[edge]
handshake_timeout = "{HANDSHAKE_TIMEOUT}s"
header_read_timeout = "{HEADER_TIMEOUT}s"
idle_timeout = "{IDLE_TIMEOUT}s"
shutdown_grace = "2s"

[analytics]
flush_interval = "5s"

[metrics]
listen = "{svc}:{METRICS_PORT}"

[admin]
listen = "{svc}:{ADMIN_PORT}"

[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [{TLS_PORT}]

[[pool]]
name = "open"
addresses = ["{open_}"]
tls_ports = [{TLS_PORT}]
cleartext_ports = [{CLEAR_PORT}]

[[site]]
host = "{CLOSED_HOST}"
pool = "closed"
origin = "http://{svc}:{ORIGIN_PORT}"
cleartext = "closed"

[[site]]
host = "{OPEN_HOST}"
pool = "open"
origin = "http://{svc}:{ORIGIN_PORT}"
cleartext = "reject"
""")
    return path


def wait_listening(addr, port, proc, what, log):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}; see {log}")
        try:
            socket.create_connection((addr, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what}: nothing listens on {addr}:{port}; see {log}")


def interrupt(*_):
    # Once: a second Ctrl-C must not break off the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=60)
    ap.add_argument("--net", default="127.0.61",
                    help="first three octets of the loopback addresses used: .1 closed pool, "
                         ".2 open pool, .3 origin, metrics and admin (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conns", type=int, default=16, help="keep-alive connections (wrk -c)")
    ap.add_argument("--delay-ms", type=int, default=10, help="pause between requests on each keep-alive connection")
    ap.add_argument("--new-conns", type=int, default=4, help="connections of the new-TLS-connection load")
    ap.add_argument("--new-delay-ms", type=int, default=50, help="pause between new TLS connections, per connection")
    ap.add_argument("--slow", type=int, default=2, help="slow clients per kind (TLS, cleartext)")
    ap.add_argument("--silent", type=int, default=2, help="silent clients per kind and pool")
    ap.add_argument("--python-load", action="store_true", help="Python threads instead of wrk for the HTTPS load")
    ap.add_argument("--origin", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.origin:
        return run_origin(args.origin)
    if args.minutes < 1:
        sys.exit("--minutes must be at least 1")
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release (bench/soak.sh does it)")
    args.use_wrk = not args.python_load and shutil.which("wrk") is not None and os.geteuid() == 0
    addrs = tuple(f"{args.net}.{i}" for i in (1, 2, 3))
    closed, open_, svc = addrs
    for addr, port in ((closed, TLS_PORT), (open_, TLS_PORT), (open_, CLEAR_PORT),
                       (svc, METRICS_PORT), (svc, ADMIN_PORT), (svc, ORIGIN_PORT)):
        try:
            socket.create_connection((addr, port), timeout=0.5).close()
            sys.exit(f"{addr}:{port} is in use (another soak?); pick other addresses with --net")
        except OSError:
            pass

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    d = tempfile.mkdtemp(prefix="portcullis-soak-")
    conf = write_config(d, addrs, args.workers)
    rows, status, interrupted = [], 0, False
    try:
        if args.use_wrk:
            hosts_lines([f"{closed} {CLOSED_HOST} {HOSTS_MARK}", f"{open_} {OPEN_HOST} {HOSTS_MARK}"])
        origin_log = os.path.join(d, "origin.log")
        origin = spawn([sys.executable, os.path.abspath(__file__), "--origin", f"{svc}:{ORIGIN_PORT}"],
                       orphan_safe=True,
                       stdout=subprocess.DEVNULL, stderr=open(origin_log, "w"))
        wait_listening(svc, ORIGIN_PORT, origin, "the origin", origin_log)
        log = os.path.join(d, "portcullis.log")
        pc = spawn([BIN, "serve", "--workers", str(args.workers), "-c", conf], orphan_safe=True,
                   stdout=open(os.path.join(d, "portcullis.out"), "w"), stderr=open(log, "w"),
                   env={**os.environ, "RUST_LOG": "warn"})
        for addr, port in ((closed, TLS_PORT), (open_, TLS_PORT), (open_, CLEAR_PORT),
                           (svc, METRICS_PORT), (svc, ADMIN_PORT)):
            wait_listening(addr, port, pc, "portcullis", log)
        ca = os.path.join(d, "state", "dev-ca.pem")
        ctx = {}
        for alpn in ("http/1.1", "h2"):
            ctx[alpn] = ssl.create_default_context(cafile=ca)
            ctx[alpn].set_alpn_protocols([alpn])
        metrics_url = f"https://{svc}:{METRICS_PORT}/metrics"

        print(f"portcullis soak: {args.minutes} min, pid {pc.pid}, workers {args.workers}, "
              f"config {conf}, log {log}")
        print(f"closed pool {closed}:{TLS_PORT}, open pool {open_}:{TLS_PORT} + cleartext :{CLEAR_PORT} "
              f"(reject), origin/metrics/admin on {svc}; timeouts: handshake {HANDSHAKE_TIMEOUT}s, "
              f"header {HEADER_TIMEOUT}s, idle {IDLE_TIMEOUT}s")
        load = "wrk" if args.use_wrk else "Python threads (no wrk, or not root)"
        print(f"HTTPS load by {load}: {args.conns} keep-alive conns, {args.delay_ms} ms apart; "
              f"{args.new_conns} new-connection loops, {args.new_delay_ms} ms apart")
        print("columns: counters are per minute; rss/fds/active sampled at the minute's end; "
              "refused = cleartext 4xx + cleartext on a TLS port")
        print(header(), flush=True)

        def sample(minute, prev, req, new, werr):
            if pc.poll() is not None:
                raise RuntimeError(f"portcullis exited with {pc.returncode}; see {log}")
            figures = metric_figures(scrape(metrics_url, ctx["http/1.1"]))
            with LOCK:
                cerr = ERRORS["total"]
            row = {"min": minute, "rss": rss_kib(pc.pid), "fds": fd_count(pc.pid),
                   "active": int(figures["active"]), "req": req, "new": new, "werr": werr,
                   "cerr": cerr - (prev["_cerr"] if prev else 0), "_cerr": cerr, "_m": figures}
            for k in ("hs_timeout", "hs_failed", "refused"):
                row[k] = int(figures[k] - (prev["_m"][k] if prev else 0))
            return row

        rows.append(sample(0, None, "-", "-", "-"))
        print(fmt(rows[0]), flush=True)
        start_clients(args, ctx, addrs)
        t0 = time.monotonic()
        steady_prev = dict(STEADY)
        for minute in range(1, args.minutes + 1):
            end = t0 + 60 * minute
            req = new = werr = 0
            if args.use_wrk:
                procs = start_wrk(args, d, max(1, int(end - time.monotonic() - 2)))
                for name, p, out in procs:
                    p.wait()
                    total, errors = wrk_result(out)
                    out.close()
                    CHILDREN.remove(p)
                    if name == "keepalive":
                        req = total
                    else:
                        new = total
                    werr += errors
            time.sleep(max(0.0, end - time.monotonic()))
            if not args.use_wrk:
                with LOCK:
                    now = dict(STEADY)
                req, new, werr = (now[k] - steady_prev[k] for k in ("req", "new", "err"))
                steady_prev = now
            rows.append(sample(minute, rows[-1], req, new, werr))
            print(fmt(rows[-1]), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", flush=True)
    except RuntimeError as e:
        print(e, flush=True)
        status = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        STOP.set()
        stop_children()
        if args.use_wrk:
            hosts_lines([])

    if len(rows) >= 2:
        print()
        print(header())
        for r in rows:
            print(fmt(r))
        warm = max(1, min(5, (len(rows) - 1) // 10))
        rss_line, rss_ok = flat("rss", rows, warm, 0.10, 1024)
        fd_line, fd_ok = flat("fds", rows, warm, 0.10, 16)
        print(f"RSS KiB: {rss_line}: {'flat' if rss_ok else 'NOT flat'} (within 10% after warm-up)")
        print(f"descriptors: {fd_line}: {'flat' if fd_ok else 'NOT flat'} (within 10% or 16 after warm-up)")
        wrk_err = sum(r["werr"] for r in rows[1:])
        print(f"wrk: {sum(r['req'] for r in rows[1:])} keep-alive requests, "
              f"{sum(r['new'] for r in rows[1:])} on new TLS connections, {wrk_err} errors")
        print(f"load clients: {ERRORS['total']} errors")
        for line in kinds_report():
            print(line)
        for what, n in sorted(ERRORS["examples"].items(), key=lambda kv: -kv[1])[:8]:
            print(f"  error {n}x: {what}")
        if status == 0 and not (rss_ok and fd_ok and wrk_err == 0 and ERRORS["total"] == 0):
            status = 1
    if status == 0 and not interrupted:
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"kept {d} (config, logs, state)")
    return status


if __name__ == "__main__":
    sys.exit(main())
