#!/usr/bin/env python3
"""portcullis vs nginx, as TLS-terminating reverse proxies on loopback.

Default mode `pinned`: each proxy on one pinned core (portcullis with one runtime thread, nginx
with one worker), the load generators and the origin on the other core. `--mode multi`: the
proxies with --workers each, nothing pinned.

Requests carry a browser User-Agent. Both proxies: ECDSA P-256 certificate, TLS 1.3, the same
worker count, access logs off, HSTS added, keep-alive connections to the same nginx origin. Runs alternate between the two for
several rounds; each figure is the median over rounds. Reports requests/s and p99 for
HTTP/1.1 keep-alive (wrk), requests/s for HTTP/2 (h2load), new TLS connections per second
(wrk with Connection: close), and CPU time per request of the proxy process(es).
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "portcullis")
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOSTS_MARK = "# portcullis-bench"
ADDR = {"nginx": "127.0.0.20", "portcullis": "127.0.0.21", "portcullis-off": "127.0.0.22"}
PORT = 9443
ORIGIN_PORT = 18080


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def host(proxy):
    return f"{proxy}.bench.test"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def setup_hosts():
    with open("/etc/hosts") as f:
        lines = [l for l in f.read().splitlines() if HOSTS_MARK not in l]
    lines += [f"{ADDR[p]} {host(p)} {HOSTS_MARK}" for p in ADDR]
    write("/etc/hosts", "\n".join(lines) + "\n")


def cleanup_hosts():
    with open("/etc/hosts") as f:
        lines = [l for l in f.read().splitlines() if HOSTS_MARK not in l]
    write("/etc/hosts", "\n".join(lines) + "\n")


def make_cert(d):
    """A CA and a leaf it signs (ECDSA P-256) for every bench hostname. wrk and h2load do not
    check certificates; h3load does, against the CA."""
    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    key, csr, crt = (os.path.join(d, f) for f in ("bench.key", "bench.csr", "bench.pem"))
    ext = os.path.join(d, "leaf.ext")
    sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "2", "-subj", "/CN=bench CA", "-keyout", ca_key, "-out", ca])
    sh(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-subj", "/CN=bench.test", "-keyout", key, "-out", csr])
    write(ext, "basicConstraints=CA:FALSE\nsubjectAltName=" + ",".join(f"DNS:{host(p)}" for p in ADDR) + "\n")
    sh(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "2", "-extfile", ext, "-out", crt])
    return crt, key, ca


def nginx_conf(d, name, workers, body):
    conf = os.path.join(d, f"{name}.conf")
    write(conf, f"""
worker_processes {workers};
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
daemon on;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    {body}
}}
""")
    return conf


def start_nginx(conf, d, name, pin=()):
    sh([*pin, "nginx", "-c", conf, "-p", d])
    pidfile = os.path.join(d, f"{name}.pid")
    for _ in range(100):
        if os.path.exists(pidfile):
            return int(open(pidfile).read().strip())
        time.sleep(0.05)
    sys.exit(f"nginx {name} did not start; see {d}/{name}.error.log")


def stop_nginx(master):
    try:
        os.kill(master, signal.SIGQUIT)
    except ProcessLookupError:
        pass


def procs_of(pid):
    """pid and its children (nginx workers)."""
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(p))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def cpu_seconds(pids):
    """(user, system) CPU seconds of the processes so far."""
    user = system = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except FileNotFoundError:
            pass
    return user / CLK_TCK, system / CLK_TCK


def wait_port(addr, port):
    import socket
    for _ in range(200):
        try:
            socket.create_connection((addr, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {addr}:{port}")


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


# Every request carries a browser's User-Agent, as real traffic does (analytics classifies it).
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0.0.0 Safari/537.36")


# Where the load generators and the origin run (taskset prefix), set by main().
LOAD = []


def run_wrk(url, conns, threads, duration, extra=()):
    out = sh([*LOAD, "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
              "-H", f"User-Agent: {USER_AGENT}", *extra, url]).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = to_ms(*m.groups()) if m else float("nan")
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = (errors.group(1) if errors else "") + (f" non-2xx {non2xx.group(1)}" if non2xx else "")
    return rps, p99, total, bad.strip()


def run_h2load(proxy, conns, streams, duration, threads):
    url = f"https://{host(proxy)}:{PORT}/"
    out = sh([*LOAD, "h2load", f"-c{conns}", f"-m{streams}", f"-t{threads}", f"-D{duration}",
              "--warm-up-time=1", "-H", f"user-agent: {USER_AGENT}", url]).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    done, failed = int(m.group(1)), int(m.group(3))
    return rps, done, ("failed %d" % failed) if failed else ""


H3LOAD = os.path.join(ROOT, "target", "release", "examples", "h3load")


def run_h3load(proxy, conns, streams, duration, ca):
    """HTTP/3 GETs with examples/h3load.rs (Debian's h2load has no HTTP/3)."""
    out = sh([*LOAD, H3LOAD, "--addr", f"{ADDR[proxy]}:{PORT}", "--host", host(proxy), "--ca", ca,
              "--conns", str(conns), "--streams", str(streams), "--duration", str(duration),
              "--user-agent", USER_AGENT]).stdout
    m = re.search(r"done (\d+) failed (\d+) rps ([\d.]+)", out)
    done, failed, rps = int(m.group(1)), int(m.group(2)), float(m.group(3))
    return rps, done, ("failed %d" % failed) if failed else ""


class Cpu:
    """CPU used during one measurement, split into user and system time."""

    def __init__(self, before, after):
        self.user = after[0] - before[0]
        self.system = after[1] - before[1]
        self.total = self.user + self.system

    def per(self, n):
        return f"cpu {self.total / n * 1e6:6.1f} us (user {self.user / n * 1e6:5.1f} + sys {self.system / n * 1e6:5.1f})"


def rss_kib(pids):
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return total


def idle_memory(proxy, pids, n):
    """KiB of proxy RSS per idle keep-alive TLS connection: n connections, one request each,
    then held open without a byte. Two figures: `burst`, the RSS growth for a first batch; and
    `steady`, the growth for a second batch of n opened 3 s later while the first is still
    held, when memory the first batch's connections gave back (portcullis hibernates a quiet
    HTTP/1.1 connection after 1 s; nginx frees its buffers at once) can serve the new ones, as
    it does on a server whose connections come and go."""
    import resource
    import socket
    import ssl
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * n + 1024)), hard))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    req = f"GET / HTTP/1.1\r\nHost: {host(proxy)}\r\nUser-Agent: {USER_AGENT}\r\n\r\n".encode()
    held = []

    def batch(net):
        for i in range(n):
            # From 100 connections per client address: portcullis caps each address at 256.
            src = (f"127.{net}.{i // 100 // 250}.{i // 100 % 250 + 1}", 0)
            raw = socket.create_connection((ADDR[proxy], PORT), source_address=src)
            s = ctx.wrap_socket(raw, server_hostname=host(proxy))
            s.sendall(req)
            got = b""
            while b"hello from the origin" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError(f"{proxy} closed a connection")
                got += chunk
            held.append(s)
        time.sleep(3)
        return rss_kib(pids)

    time.sleep(1)
    before = rss_kib(pids)
    try:
        first = batch(1)
        second = batch(2)
    finally:
        for s in held:
            s.close()
    return (first - before) / n, (second - first) / n


def reload_time(d, sites):
    """A portcullis with `sites` sites: RSS per site, and how long a SIGHUP reload takes (from
    the signal to the log line saying the config applies), median of 5."""
    path = os.path.join(d, "many.toml")
    lines = [f"""
[state]
dir = "{d}/state-many"
[[pool]]
name = "many"
addresses = ["127.0.0.23"]
tls_ports = [{PORT}]
"""]
    for i in range(sites):
        lines.append(f'[[site]]\nhost = "s{i:05}.many.test"\npool = "many"\norigin = "http://127.0.0.1:{ORIGIN_PORT}"\n')
    write(path, "".join(lines))
    log = os.path.join(d, "many.log")
    pc = subprocess.Popen([*PROXY, BIN, "serve", "--workers", "1", "-c", path], stdout=subprocess.DEVNULL,
                          stderr=open(log, "w"), env={**os.environ, "RUST_LOG": "info"})
    try:
        wait_port("127.0.0.23", PORT)
        time.sleep(1)
        rss = rss_kib([pc.pid])
        times = []
        for gen in range(2, 7):
            sent = time.time()
            pc.send_signal(signal.SIGHUP)
            mark = f"config applied generation={gen}"
            for _ in range(600):
                text = open(log).read()
                if mark in text:
                    break
                time.sleep(0.01)
            line = next(l for l in text.splitlines() if mark in l)
            stamp = re.match(r"(\S+)Z", line).group(1)
            from datetime import datetime, timezone
            at = datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()
            times.append((at - sent) * 1000)
        return rss, statistics.median(times)
    finally:
        pc.send_signal(signal.SIGTERM)
        pc.wait(timeout=20)


# The proxies' taskset prefix, set by main().
PROXY = []


def measure(proxy, pids, fn):
    before = cpu_seconds(pids)
    result = fn()
    return result, Cpu(before, cpu_seconds(pids))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    ap.add_argument("--conns", type=int, default=64, help="keep-alive connections (HTTP/1.1)")
    ap.add_argument("--workers", type=int, default=2, help="proxy worker processes/threads (multi mode)")
    ap.add_argument("--mode", choices=["pinned", "multi"], default="pinned")
    ap.add_argument("--idle", type=int, default=2000, help="idle TLS connections held for the memory figure")
    ap.add_argument("--sites", type=int, default=10000, help="sites of the reload figure")
    args = ap.parse_args()
    global LOAD, PROXY
    if args.mode == "pinned":
        if os.cpu_count() < 2:
            sys.exit("pinned mode needs two cores; use --mode multi")
        args.workers = 1
        PROXY, LOAD = ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release")

    d = tempfile.mkdtemp(prefix="portcullis-bench-")
    crt, key, ca = make_cert(d)
    setup_hosts()
    origin_conf = nginx_conf(d, "origin", 1, f"""
    server {{
        listen 127.0.0.1:{ORIGIN_PORT};
        location / {{ return 200 "hello from the origin\\n"; }}
    }}""")
    proxy_conf = nginx_conf(d, "nginx", args.workers, f"""
    upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 256; }}
    server {{
        listen {ADDR['nginx']}:{PORT} ssl http2;
        server_name {host('nginx')};
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        add_header Strict-Transport-Security "max-age=31536000" always;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}""")
    for name, enabled in (("portcullis", "true"), ("portcullis-off", "false")):
        write(os.path.join(d, f"{name}.toml"), f"""
[state]
dir = "{d}/state-{name}"
[analytics]
enabled = {enabled}
[[pool]]
name = "bench"
addresses = ["{ADDR[name]}"]
tls_ports = [{PORT}]
[[site]]
host = "{host(name)}"
pool = "bench"
origin = "http://127.0.0.1:{ORIGIN_PORT}"
cert = "{crt}"
key = "{key}"
""")

    origin = start_nginx(origin_conf, d, "origin", LOAD)
    nginx = start_nginx(proxy_conf, d, "nginx", PROXY)
    pcs = {
        name: subprocess.Popen([*PROXY, BIN, "serve", "--workers", str(args.workers), "-c", os.path.join(d, f"{name}.toml")],
                               stderr=open(os.path.join(d, f"{name}.log"), "w"), env={**os.environ, "RUST_LOG": "warn"})
        for name in ("portcullis", "portcullis-off")
    }
    try:
        for p in ADDR:
            wait_port(ADDR[p], PORT)
        pids = {"nginx": procs_of(nginx), **{name: [pc.pid] for name, pc in pcs.items()}}
        # Warm all up (origin keep-alive pools, page cache, CPU frequency).
        for p in ADDR:
            run_wrk(f"https://{host(p)}:{PORT}/", args.conns, 2, 2)

        results = {p: {"h1": [], "h1p99": [], "h1cpu": [], "h2": [], "h2cpu": [], "h3": [], "h3cpu": [], "conn": [], "conncpu": []} for p in ADDR}
        # Idle memory first, once per proxy: memory freed by the load rounds would be reused by
        # the next connections, and RSS would not grow for them.
        for p in ADDR:
            burst, steady = idle_memory(p, pids[p], args.idle)
            results[p]["idle"] = [burst]
            results[p]["idle2"] = [steady]
            print(f"  {p:22} idle memory   {burst:10.1f} KiB per idle TLS connection for a first {args.idle}, {steady:.1f} KiB for {args.idle} more (measured once, before the rounds)")
        print("portcullis runs with analytics on (the default); portcullis-off with [analytics] enabled = false")
        print(f"mode={args.mode} rounds={args.rounds} duration={args.duration}s conns={args.conns} workers={args.workers} cores={os.cpu_count()}")
        for r in range(args.rounds):
            order = list(ADDR)[r % 3:] + list(ADDR)[:r % 3]
            for p in order:
                url = f"https://{host(p)}:{PORT}/"
                (rps, p99, n, bad), cpu = measure(p, pids[p], lambda: run_wrk(url, args.conns, 2, args.duration))
                results[p]["h1"].append(rps)
                results[p]["h1p99"].append(p99)
                results[p]["h1cpu"].append(cpu.total / n * 1e6)
                print(f"  round {r+1} {p:14} h1 keep-alive {rps:10.0f} req/s  p99 {p99:7.2f} ms  {cpu.per(n)}/req {bad}")
                (rps, n, bad), cpu = measure(p, pids[p], lambda: run_h2load(p, 16, 16, args.duration, 2))
                results[p]["h2"].append(rps)
                results[p]["h2cpu"].append(cpu.total / n * 1e6)
                print(f"  round {r+1} {p:14} h2            {rps:10.0f} req/s                {cpu.per(n)}/req {bad}")
                if p != "nginx":
                    (rps, n, bad), cpu = measure(p, pids[p], lambda: run_h3load(p, 16, 16, args.duration, ca))
                    results[p]["h3"].append(rps)
                    results[p]["h3cpu"].append(cpu.total / n * 1e6)
                    print(f"  round {r+1} {p:14} h3            {rps:10.0f} req/s                {cpu.per(n)}/req {bad}")
                (rps, p99, n, bad), cpu = measure(p, pids[p], lambda: run_wrk(url, 32, 2, args.duration, ("-H", "Connection: close")))
                results[p]["conn"].append(rps)
                results[p]["conncpu"].append(cpu.total / n * 1e6)
                print(f"  round {r+1} {p:14} new TLS conns {rps:10.0f} conn/s               {cpu.per(n)}/conn {bad}")

        med = {p: {k: statistics.median(v) if v else float("nan") for k, v in m.items()} for p, m in results.items()}
        pcm, ngm, off = med["portcullis"], med["nginx"], med["portcullis-off"]
        rows = [
            ("HTTP/1.1 keep-alive req/s", "h1", True),
            ("HTTP/1.1 keep-alive p99 ms", "h1p99", False),
            ("HTTP/1.1 CPU us/request", "h1cpu", False),
            ("HTTP/2 req/s", "h2", True),
            ("HTTP/2 CPU us/request", "h2cpu", False),
            ("HTTP/3 req/s", "h3", True),
            ("HTTP/3 CPU us/request", "h3cpu", False),
            ("new TLS connections/s", "conn", True),
            ("new TLS conn CPU us/conn", "conncpu", False),
            ("KiB per idle TLS conn (burst)", "idle", False),
            ("KiB per idle TLS conn (steady)", "idle2", False),
        ]
        print()
        print(f"{'median of ' + str(args.rounds) + ' rounds':32} {'portcullis':>12} {'nginx':>12} {'portcullis/nginx':>17} {'analytics off':>14} {'on/off':>8}")
        for label, k, _ in rows:
            on_off = pcm[k] / off[k] if off[k] else float("nan")
            if ngm[k] != ngm[k]:  # no nginx figure (HTTP/3)
                peer = f"{'n/a':>12} {'n/a':>17}"
            else:
                ratio = pcm[k] / ngm[k] if ngm[k] else float("nan")
                peer = f"{ngm[k]:12.2f} {ratio:16.2f}x"
            print(f"{label:32} {pcm[k]:12.2f} {peer} {off[k]:14.2f} {on_off:7.2f}x")
        print("HTTP/3: nginx 1.22 (Debian 12) has no QUIC, so those rows are portcullis's own: "
              f"HTTP/3 costs {pcm['h3cpu'] / pcm['h2cpu']:.2f}x its HTTP/2 CPU per request "
              "(h3load: 16 connections x 16 streams, as h2load)")
        rss, ms = reload_time(d, args.sites)
        print(f"portcullis with {args.sites} sites: reload (SIGHUP to applied) {ms:.0f} ms median of 5;"
              f" RSS {rss / 1024:.1f} MiB, {rss * 1024 / args.sites:.0f} bytes per site")
    finally:
        for pc in pcs.values():
            pc.send_signal(signal.SIGTERM)
            try:
                pc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pc.kill()
        stop_nginx(nginx)
        stop_nginx(origin)
        cleanup_hosts()


if __name__ == "__main__":
    main()
