#!/usr/bin/env python3
"""A fleet of portcullis nodes on one PostgreSQL (not run by CI).

Starts PostgreSQL (Debian's, default durability: fsync and synchronous commit on) on loopback
and --nodes portcullis nodes (release build) sharing it, each with the same --sites sites
(cleartext = "reject" on an open pool) and default settings (analytics flushed every 5 s).
Then measures, all on this machine:

  idle         database CPU while the fleet only heartbeats and polls;
  propagation  --changes mode changes made through node 0's admin API, each timed from the
               request until every other node serves it (each polled over HTTP): p50, p99, max;
  flush        cleartext load with wrk on every node for --duration seconds over random sites
               and paths; the observations counted, how long until all of them are in the
               store, the rows the nodes wrote, and the database CPU they cost;

and prints the largest fleet those figures suggest one database core can serve. Everything
shares the machine's cores (nodes, load, database): the figures are a floor, not a ceiling.
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "portcullis")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ADDR = "127.0.9.1"
PG_PORT = 5432
PG_EXTRA = os.environ.get("PG_EXTRA", "").split()


def node_addr(i):
    return f"127.0.9.{10 + i}"


def site(i):
    return f"s{i:05}.fleet.test"


def sh(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stderr}")
    return out


def pg_bin(name):
    found = sorted(
        os.path.join("/usr/lib/postgresql", v, "bin", name)
        for v in os.listdir("/usr/lib/postgresql")
        if os.path.exists(os.path.join("/usr/lib/postgresql", v, "bin", name))
    )
    if not found:
        sys.exit(f"no {name} under /usr/lib/postgresql/*/bin: apt-get install postgresql")
    return found[-1]


def as_postgres():
    """The command prefix that runs PostgreSQL as the postgres user (it refuses root)."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"] if os.geteuid() == 0 else []


def start_postgres(d):
    pgdir = os.path.join(d, "pg")
    os.makedirs(pgdir)
    if os.geteuid() == 0:
        shutil.chown(pgdir, "postgres", "postgres")
    data = os.path.join(pgdir, "data")
    sh([*as_postgres(), pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"])
    with open(os.path.join(data, "pg_hba.conf"), "w") as f:
        f.write("local all all trust\nhost all all 127.0.0.0/8 trust\n")
    log = open(os.path.join(pgdir, "postgres.log"), "w")
    proc = subprocess.Popen(
        [*as_postgres(), pg_bin("postgres"), "-D", data, "-k", pgdir, "-p", str(PG_PORT),
         "-c", f"listen_addresses={PG_ADDR}", "-c", "max_connections=300", *PG_EXTRA],
        stdout=log, stderr=log)
    for _ in range(200):
        if subprocess.run([pg_bin("pg_isready"), "-h", PG_ADDR, "-p", str(PG_PORT)],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        sys.exit(f"PostgreSQL did not start; see {pgdir}/postgres.log")
    psql("CREATE DATABASE fleet", db="postgres")
    return proc


def psql(sql, db="fleet"):
    out = sh([pg_bin("psql"), f"postgres://postgres@{PG_ADDR}:{PG_PORT}/{db}", "-tA",
              "-v", "ON_ERROR_STOP=1", "-c", sql])
    return out.stdout.strip()


def postmaster_cpu(pid):
    """CPU seconds of the postmaster and every backend, living or reaped."""
    total = 0.0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(p) == pid:
            # Its own time, and that of the backends it has reaped.
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def proc_cpu(pids):
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except FileNotFoundError:
            pass
    return total


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def postgres_pid(proc):
    """The postmaster's pid (setpriv execs it, so it is the child's own pid)."""
    return proc.pid


def config(d, i, sites):
    state = os.path.join(d, f"node{i}")
    lines = [f"""
[state]
dir = "{state}"
[node]
name = "node{i}"
[store]
url = "postgres://postgres@{PG_ADDR}:{PG_PORT}/fleet?sslmode=disable"
[admin]
listen = "{node_addr(i)}:6444"
[[pool]]
name = "open"
addresses = ["{node_addr(i)}"]
tls_ports = [6443]
cleartext_ports = [6080]
"""]
    for s in range(sites):
        lines.append(f'[[site]]\nhost = "{site(s)}"\npool = "open"\norigin = "http://127.0.0.1:9"\ncleartext = "reject"\n')
    path = os.path.join(d, f"node{i}.toml")
    with open(path, "w") as f:
        f.write("".join(lines))
    os.makedirs(state, exist_ok=True)
    return path, state


def token_of(out):
    m = re.search(r"admin token \(.*\): (\S+)", open(out).read())
    return m.group(1) if m else None


def wait_ready(proc, out, addr, ca, seconds=180):
    """Waits until the node's admin API says it is ready with its store up; its token."""
    deadline = time.monotonic() + seconds
    while not (os.path.exists(ca) and token_of(out)) and time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"node at {addr} exited: {open(out).read()[-2000:]}")
        time.sleep(0.1)
    token = token_of(out)
    ctx = ssl.create_default_context(cafile=ca)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"node at {addr} exited: {open(out).read()[-2000:]}")
        try:
            c = http.client.HTTPSConnection(addr, 6444, context=ctx, timeout=2)
            c.request("GET", "/readyz", headers={"Authorization": f"Bearer {token}"})
            r = c.getresponse()
            body = r.read()
            if r.status == 200 and b'"store":"up"' in body:
                return token
        except (OSError, ssl.SSLError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    sys.exit(f"node at {addr} not ready with its store up in {seconds} s")


class Poller(threading.Thread):
    """Asks one node for one site until it answers `status`; records when."""

    def __init__(self, addr):
        super().__init__(daemon=True)
        self.addr = addr
        self.conn = http.client.HTTPConnection(addr, 6080, timeout=5)
        self.job = None
        self.ready = threading.Event()
        self.done = threading.Event()

    def ask(self, host, status):
        self.job = (host, status)
        self.done.clear()
        self.ready.set()

    def run(self):
        while True:
            self.ready.wait()
            self.ready.clear()
            host, status = self.job
            while True:
                try:
                    self.conn.request("GET", "/", headers={"Host": host, "User-Agent": "fleet-bench"})
                    r = self.conn.getresponse()
                    r.read()
                    got = r.status
                except (OSError, http.client.HTTPException):
                    self.conn = http.client.HTTPConnection(self.addr, 6080, timeout=5)
                    got = None
                if got == status:
                    self.at = time.monotonic()
                    break
                time.sleep(0.002)
            self.done.set()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


WRK_LUA = """
math.randomseed(%d)
local paths = {"/", "/v1/items", "/v1/users/42", "/login", "/static/app.js", "/api/health"}
local agents = {"curl/8.5.0", "python-requests/2.31", "Go-http-client/1.1", "okhttp/4.12",
  "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/121.0"}
request = function()
  local host = string.format("s%%05d.fleet.test", math.random(0, %d))
  return wrk.format("GET", paths[math.random(#paths)],
    {["Host"] = host, ["User-Agent"] = agents[math.random(#agents)]})
end
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--sites", type=int, default=10000)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--duration", type=int, default=20, help="seconds of cleartext load")
    ap.add_argument("--idle", type=int, default=15, help="seconds of idle measurement")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release")
    d = tempfile.mkdtemp(prefix="portcullis-fleet-")
    os.chmod(d, 0o755)  # PostgreSQL runs as its own user below it
    procs = []
    pg = None
    try:
        pg = start_postgres(d)
        pgpid = postgres_pid(pg)
        key = os.urandom(32)
        nodes = []
        t0 = time.monotonic()
        for i in range(args.nodes):
            path, state = config(d, i, args.sites)
            # One installation secret for the fleet (README, [store]).
            keyfile = os.path.join(state, "fingerprint.key")
            with open(keyfile, "wb") as f:
                f.write(key)
            os.chmod(keyfile, 0o600)
            out = open(os.path.join(d, f"node{i}.out"), "w")
            p = subprocess.Popen([BIN, "serve", "-c", path, "--workers", "1"], stdout=out,
                                 stderr=subprocess.STDOUT)
            procs.append(p)
            nodes.append((p, state))
        tokens = [wait_ready(p, os.path.join(d, f"node{i}.out"), node_addr(i), os.path.join(state, "dev-ca.pem"))
                  for i, (p, state) in enumerate(nodes)]
        started = time.monotonic() - t0
        token = tokens[0]
        rss = [rss_kib(p.pid) for p, _ in nodes]
        print(f"{args.nodes} nodes x {args.sites} sites on one PostgreSQL, {os.cpu_count()} cores shared by all")
        print(f"  all nodes ready (store up) in {started:.1f} s; RSS per node median {statistics.median(rss) / 1024:.1f} MiB"
              f" ({statistics.median(rss) * 1024 / args.sites:.0f} bytes per site)")

        # Idle: heartbeats, generation polls, LISTEN connections.
        c0, w0 = postmaster_cpu(pgpid), time.monotonic()
        time.sleep(args.idle)
        idle = (postmaster_cpu(pgpid) - c0) / (time.monotonic() - w0)
        print(f"  idle: database CPU {idle * 100:.2f}% of a core for {args.nodes} nodes"
              f" ({idle * 100 / args.nodes:.3f}% per node)")

        # Propagation.
        ctx = ssl.create_default_context(cafile=os.path.join(nodes[0][1], "dev-ca.pem"))
        admin = http.client.HTTPSConnection(node_addr(0), 6444, context=ctx, timeout=10)
        pollers = [Poller(node_addr(i)) for i in range(1, args.nodes)]
        for p in pollers:
            p.start()
        lat, api, apply_cpu = [], [], []
        node_pids = [p.pid for p, _ in nodes]
        rng = random.Random(1)
        for k in range(args.changes):
            # Every change is one: a site moves from reject to redirect, then back.
            if k % 2 == 0:
                host = site(rng.randrange(args.sites))
            mode, status = ("redirect", 301) if k % 2 == 0 else ("reject", 403)
            body = json.dumps({"cleartext": mode})
            cpu0 = proc_cpu(node_pids)
            sent = time.monotonic()
            for p in pollers:
                p.ask(host, status)
            admin.request("PATCH", f"/api/sites/{host}", body=body,
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            r = admin.getresponse()
            text = r.read()
            if r.status != 200:
                sys.exit(f"PATCH {host}: {r.status} {text[:200]!r}")
            api.append(time.monotonic() - sent)
            for p in pollers:
                if not p.done.wait(30):
                    sys.exit(f"{p.addr} did not apply {host} = {mode} within 30 s")
                lat.append(p.at - sent)
            apply_cpu.append((proc_cpu(node_pids) - cpu0) / args.nodes)
            time.sleep(0.05)
        ms = [x * 1000 for x in lat]
        print(f"  propagation ({args.changes} changes x {args.nodes - 1} nodes, from the PATCH sent on node0"
              f" to the node serving it): p50 {pct(ms, 50):.0f} ms, p99 {pct(ms, 99):.0f} ms, max {max(ms):.0f} ms;"
              f" the PATCH itself p50 {pct([x * 1000 for x in api], 50):.0f} ms")
        print(f"    each node spends {statistics.median(apply_cpu) * 1000:.0f} ms of CPU per change (median; the"
              f" apply of {args.sites} sites, and answering the pollers): with {args.nodes} nodes on"
              f" {os.cpu_count()} cores the applies queue, so on one machine per node expect about the"
              f" PATCH's time")

        # Flush throughput, from a store that holds every count so far (the pollers' requests).
        total = lambda: int(psql("SELECT coalesce(sum(count), 0) FROM traffic WHERE span = 60"))
        before = total()
        while True:
            time.sleep(6)
            again = total()
            if again == before:
                break
            before = again
        rows_before = int(psql("SELECT count(*) FROM traffic")) + int(psql("SELECT count(*) FROM dims"))
        wrks = []
        for i in range(args.nodes):
            lua = os.path.join(d, f"wrk{i}.lua")
            with open(lua, "w") as f:
                f.write(WRK_LUA % (i + 1, args.sites - 1))
            wrks.append(subprocess.Popen(
                ["wrk", "-t1", "-c4", f"-d{args.duration}s", "-s", lua, f"http://{node_addr(i)}:6080/"],
                stdout=subprocess.PIPE, text=True))
        c0, w0 = postmaster_cpu(pgpid), time.monotonic()
        n0 = proc_cpu(node_pids)
        sent = 0
        for w in wrks:
            out = w.communicate()[0]
            sent += int(re.search(r"(\d+) requests in", out).group(1))
        load_end = time.monotonic()
        deadline = load_end + 60
        counted = before
        while time.monotonic() < deadline:
            counted = total()
            if counted - before >= sent:
                break
            time.sleep(0.2)
        lag = time.monotonic() - load_end
        db_cpu = postmaster_cpu(pgpid) - c0
        nodes_cpu = proc_cpu(node_pids) - n0
        wall = time.monotonic() - w0
        rows = int(psql("SELECT count(*) FROM traffic")) + int(psql("SELECT count(*) FROM dims")) - rows_before
        got = counted - before
        rate = sent / args.duration
        # wrk does not count the requests in flight when it stops; the nodes do.
        verdict = "all of them" if got >= sent else f"MISSING {sent - got}"
        print(f"  flush: {sent} cleartext requests in {args.duration} s over {args.nodes} nodes"
              f" ({rate:.0f}/s, uniformly spread over sites, paths and clients: about one row per"
              f" observation, the store's worst case); {got} counted in the store ({verdict})"
              f" {lag:.1f} s after the load ended (flush_interval 5 s)")
        print(f"    {rows} traffic and dims rows written; database CPU {db_cpu:.2f} s over {wall:.1f} s"
              f" ({db_cpu / wall * 100:.1f}% of a core): {db_cpu / max(rows, 1) * 1e6:.1f} us per row,"
              f" {db_cpu / max(got, 1) * 1e6:.1f} us per observation; nodes' CPU {nodes_cpu:.1f} s")

        # The largest fleet one database core would serve at these rates.
        per_node_busy = db_cpu / wall / args.nodes
        per_node_idle = idle / args.nodes
        print("  one database core, at these figures:")
        print(f"    idle nodes: about {int(1 / per_node_idle) if per_node_idle > 0 else 'unbounded'}")
        print(f"    nodes each counting {rate / args.nodes:.0f} cleartext requests/s over {args.sites} sites:"
              f" about {int(1 / per_node_busy)}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if pg:
            pg.send_signal(signal.SIGINT)
            try:
                pg.wait(20)
            except subprocess.TimeoutExpired:
                pg.kill()
        if args.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
