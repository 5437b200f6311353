#!/usr/bin/env python3
"""Queries per second: portcullis' DNS server against Knot DNS, same zone, same queries.

The zone has one site per name (A, and an HTTPS record) plus a wildcard; the query mix is
A and HTTPS for existing names, some AAAA (NODATA) and some NXDOMAIN. Rounds alternate the two
servers; the table shows medians and the ratio portcullis/knot, plus each server's CPU time per
query.
"""

import argparse
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "portcullis")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ZONE = "bench.test"
PC_ADDR, KNOT_ADDR, PORT = "127.0.0.30", "127.0.0.31", 5353


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_dns(addr):
    q = bytes.fromhex("abcd01000001000000000000") + b"".join(
        bytes([len(l)]) + l.encode() for l in f"site0.{ZONE}".split(".")) + b"\x00\x00\x01\x00\x01"
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.2)
        try:
            s.sendto(q, (addr, PORT))
            s.recvfrom(512)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    sys.exit(f"no DNS answer from {addr}:{PORT}")


def dnsperf(addr, queries, seconds, clients):
    out = subprocess.run(["dnsperf", "-s", addr, "-p", str(PORT), "-d", queries, "-l", str(seconds),
                          "-c", str(clients), "-q", "200"], check=True, capture_output=True, text=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    return qps, done, lost


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--sites", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="portcullis-dnsbench-")
    sites = "".join(f"""
[[site]]
host = "site{i}.{ZONE}"
pool = "p{i % 4}"
origin = "http://127.0.0.1:9"
""" for i in range(args.sites))
    pools = "".join(f"""
[[pool]]
name = "p{i}"
addresses = ["192.0.2.{i + 1}", "2001:db8::{i + 1}"]
tls_ports = [443]
""" for i in range(4))
    config = os.path.join(d, "portcullis.toml")
    with open(config, "w") as f:
        f.write(f"""
[state]
dir = "{d}/state"
[analytics]
enabled = false
[dns]
listen = "{PC_ADDR}:{PORT}"
zones = ["{ZONE}"]
ttl = 300
{pools}
{sites}
[[site]]
host = "*.apps.{ZONE}"
pool = "p0"
origin = "http://127.0.0.1:9"
""")
    # The pools' documentation addresses cannot be bound: serve DNS from a config copy whose
    # pools are not listened on (check the real one, serve with `dns-only` semantics below).
    zonefile = os.path.join(d, f"{ZONE}.zone")
    with open(zonefile, "w") as f:
        subprocess.run([BIN, "dns", "export", ZONE, "-c", config], check=True, stdout=f)
    with open(os.path.join(d, "knot.conf"), "w") as f:
        f.write(f"""
server:
    listen: {KNOT_ADDR}@{PORT}
    rundir: "{d}"
    udp-workers: 2
    tcp-workers: 1
log:
  - target: stderr
    any: error
database:
    storage: "{d}/knotdb"
zone:
  - domain: {ZONE}
    file: "{zonefile}"
    storage: "{d}"
""")
    queries = os.path.join(d, "queries.txt")
    rnd = random.Random(7)
    with open(queries, "w") as f:
        for _ in range(20000):
            r = rnd.random()
            i = rnd.randrange(args.sites)
            if r < 0.45:
                f.write(f"site{i}.{ZONE} A\n")
            elif r < 0.8:
                f.write(f"site{i}.{ZONE} HTTPS\n")
            elif r < 0.9:
                f.write(f"x{i}.apps.{ZONE} A\n")
            else:
                f.write(f"missing{i}.{ZONE} A\n")
    pc = subprocess.Popen([BIN, "dns", "serve", "-c", config, "--workers", "2"], stderr=subprocess.DEVNULL)
    knot = subprocess.Popen(["knotd", "-c", os.path.join(d, "knot.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_dns(PC_ADDR)
        wait_dns(KNOT_ADDR)
        servers = {"portcullis": (PC_ADDR, pc.pid), "knot": (KNOT_ADDR, knot.pid)}
        res = {k: {"qps": [], "cpu": []} for k in servers}
        print(f"rounds={args.rounds} duration={args.duration}s sites={args.sites} dnsperf clients={args.clients} cores={os.cpu_count()}")
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(list(servers)))
            for name in order:
                addr, pid = servers[name]
                c0 = cpu(pid)
                qps, done, lost = dnsperf(addr, queries, args.duration, args.clients)
                used = cpu(pid) - c0
                res[name]["qps"].append(qps)
                res[name]["cpu"].append(used / max(done, 1) * 1e6)
                print(f"  round {r + 1} {name:10} {qps:10.0f} queries/s  cpu {used / max(done, 1) * 1e6:6.2f} us/query  lost {lost}")
        med = {k: {m: statistics.median(v) for m, v in x.items()} for k, x in res.items()}
        print()
        print(f"{'median':24} {'portcullis':>12} {'knot':>12} {'portcullis/knot':>16}")
        for label, m in (("queries/s", "qps"), ("CPU us/query", "cpu")):
            p, k = med["portcullis"][m], med["knot"][m]
            print(f"{label:24} {p:12.2f} {k:12.2f} {p / k:15.2f}x")
    finally:
        for p in (pc, knot):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
