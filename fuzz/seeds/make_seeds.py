#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (committed; run once by hand).

native_server / native_client / criu_header: messages encoded as the byte tables of
runtime/src/protocol/mod.rs, protocol/upload.rs and protocol/criu.rs lay them out.
images: the files of a real `criu dump` of a small process (IMG=dir, see FUZZING.md), framed
as the images target reads its input.
"""
import os, struct, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")

def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def hello(ck, token=b"", client=b"", version=2, flags=0):
    return (b"DPPS" + struct.pack("<HHHHHH", version, flags, len(ck), len(token), len(client), 0)
            + ck + token + client)

def request(rid, kind, ranges, flags=0):
    b = struct.pack("<IHHII", rid, kind, len(ranges), flags, 0)
    for pid, nr, vaddr in ranges:
        b += struct.pack("<IIQ", pid, nr, vaddr)
    return b

def file_header(kind, name, size):
    return struct.pack("<HHIQ", kind, len(name), 0, size) + name

def hello_reply(status=1, version=2, max_ranges=256, max_pages=4096, msg=b""):
    return b"DPPS" + struct.pack("<HHHHI", version, status, max_ranges, len(msg), max_pages) + msg

def response(rid, status, nr_ranges, msg=b""):
    return struct.pack("<IHHH", rid, status, nr_ranges, len(msg)) + b"\0" * 6 + msg

def range_reply(status, nr_pages, bitmap_bits):
    if status != 1:
        return struct.pack("<HHIII", status, 0, 0, 0, 0)
    data = sum(bitmap_bits)
    bm = bytearray((nr_pages + 7) // 8)
    for i, bit in enumerate(bitmap_bits):
        if bit:
            bm[i // 8] |= 1 << (i % 8)
    return (struct.pack("<HHIII", status, 0, nr_pages, data, 0) + bytes(bm)
            + b"".join(bytes([i & 0xff]) * 4096 for i, bit in enumerate(bitmap_bits) if bit))

# native_server: byte 0 = mode (even read session, odd upload session)
put("native_server", "read-session", b"\0" + hello(b"web-1", b"s3cret", b"ctr-1")
    + request(1, 1, [(1, 16, 0x7f0000000000), (1, 1, 0x400000)])
    + request(2, 1, [(2, 4, 0x1000)], flags=1) + request(3, 2, []))
put("native_server", "criu-mode", b"\0" + hello(b"ckpt-a1", b"t", b"", flags=1))
put("native_server", "info-v1", b"\0" + hello(b"x", version=1) + request(7, 3, []))
put("native_server", "upload", b"\1" + hello(b"new-ckpt", b"tok", b"shim", flags=2)
    + file_header(1, b"inventory.img", 8) + b"\x16\x31\x31\x58\x04\x00\x00\x00"
    + file_header(1, b"pages-1.img", 0) + file_header(2, b"", 2))
put("native_server", "bad-id", b"\0" + hello(b"../../etc", b"", b""))

# native_client: byte 0 = pages per range - 1, byte 1 = ranges per response - 1
put("native_client", "ok-mixed", bytes([15, 1]) + hello_reply()
    + response(1, 1, 2) + range_reply(1, 16, [1, 0, 0, 1] + [0] * 12) + range_reply(3, 0, []))
put("native_client", "refused", bytes([0, 0]) + hello_reply(status=3, max_ranges=0, max_pages=0,
                                                      msg=b"wrong or missing token"))
put("native_client", "first-run", bytes([7, 0]) + hello_reply() + response(1, 1, 1)
    + range_reply(1, 3, [1, 1, 1]) + response(2, 3, 0, b"malformed request"))

# criu_header: CRIU 4.1 (24-byte) and 4.2 (32-byte) page-server headers
def v41(cmd, nr, vaddr, dst):
    return struct.pack("<IIQQ", cmd, nr, vaddr, dst)
def v42(cmd, nr, vaddr, dst):
    return struct.pack("<IIQQQ", cmd, 0, nr, vaddr, dst)
pid = lambda p: (p << 8) | 1
put("criu_header", "v41-get", v41(7, 16, 0x7f0000000000, pid(1)) + v41(0x1023, 0, 0, 0))
put("criu_header", "v42-get", v42(7, 16, 0x7f0000000000, pid(1)) + v42(0x1023, 0, 0, 0))
put("criu_header", "v41-push", v41(4, 0, 0, pid(42)) + v41(1, 2, 0x400000, pid(42))
    + v41(2, 1, 0x402000, pid(42)) + v41(6 | (1 << 16), 1, 0x403000, pid(42)) + v41(0x1024, 0, 0, 0))
put("criu_header", "v42-shmem", v42(3, 0, 0, (5 << 8) | 2) + v42(5, 0, 0, 0))

# images: flags byte, then [file u8][len u16][bytes] records
img = os.environ.get("IMG")
if img:
    files = sorted(os.listdir(img))
    pstree = open(os.path.join(img, "pstree.img"), "rb").read()
    def rec(i, b):
        return bytes([i]) + struct.pack("<H", len(b)) + b
    mm = [f for f in files if f.startswith("mm-")][0]
    pm = [f for f in files if f.startswith("pagemap-")][0]
    pages = [f for f in files if f.startswith("pages-")][0]
    body = (rec(0, open(os.path.join(img, "inventory.img"), "rb").read()) + rec(1, pstree)
            + rec(2, open(os.path.join(img, mm), "rb").read())
            + rec(3, open(os.path.join(img, pm), "rb").read())
            + rec(4, struct.pack("<I", os.path.getsize(os.path.join(img, pages)))))
    put("images", "real-dump", b"\0" + body)
    put("images", "real-dump-parent-loop", b"\1" + body)
    put("images", "real-dump-missing-parent", b"\2" + body)
    put("images", "real-dump-short-pages", b"\0" + body[:-4] + struct.pack("<I", 4096))
elif not os.path.isdir(os.path.join(ROOT, "images")):
    sys.exit("IMG=<criu dump dir> is needed for the images seeds")
