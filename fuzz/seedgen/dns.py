#!/usr/bin/env python3
"""Writes the dns fuzz target's seed queries to fuzz/seeds/dns/ (run from anywhere).

Each seed is one DNS message as a client sends it over UDP (RFC 1035 section 4), for the
names served by the zone in fuzz_targets/dns.rs. Standard library only, so regenerating the
seeds needs no build.
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seeds", "dns")

TYPES = {"A": 1, "NS": 2, "SOA": 6, "AAAA": 28, "OPT": 41, "HTTPS": 65, "ANY": 255}


def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query(qid, qname, qtype, flags=0x0100, edns=None, opcode=0):
    """flags 0x0100 is RD; edns is (udp payload size, version, DO bit) or None."""
    flags |= opcode << 11
    arcount = 1 if edns else 0
    msg = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, arcount)
    msg += name(qname) + struct.pack(">HH", TYPES[qtype], 1)
    if edns:
        size, version, do = edns
        ttl = (version << 16) | (0x8000 if do else 0)
        msg += b"\x00" + struct.pack(">HHIH", TYPES["OPT"], size, ttl, 0)
    return msg


SEEDS = {
    "a-api": query(0x1001, "api.example.test", "A"),
    "aaaa-api": query(0x1002, "api.example.test", "AAAA"),
    "https-api": query(0x1003, "api.example.test", "HTTPS"),
    "a-wildcard": query(0x1004, "x.apps.example.test", "A"),
    "soa-apex": query(0x1005, "example.test", "SOA"),
    "ns-apex": query(0x1006, "example.test", "NS"),
    "any-apex": query(0x1007, "example.test", "ANY"),
    "a-nxdomain": query(0x1008, "missing.example.test", "A"),
    "a-refused": query(0x1009, "outside.other.test", "A"),
    "a-subzone": query(0x100A, "www.sub.example.test", "A"),
    "edns-https": query(0x100B, "api.example.test", "HTTPS", edns=(1232, 0, True)),
    "edns-badvers": query(0x100C, "api.example.test", "A", edns=(4096, 1, False)),
    "notify-opcode": query(0x100D, "example.test", "SOA", opcode=4),
    "response-bit": query(0x100E, "api.example.test", "A", flags=0x8000),
    "mixed-case": query(0x100F, "ApI.ExAmPlE.TeSt", "A"),
    "header-only": struct.pack(">HHHHHH", 0x1010, 0x0100, 0, 0, 0, 0),
}

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for stem, msg in SEEDS.items():
        with open(os.path.join(OUT, stem + ".bin"), "wb") as f:
            f.write(msg)
    print(f"{len(SEEDS)} seeds in {os.path.normpath(OUT)}")
