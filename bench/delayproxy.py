#!/usr/bin/env python3
"""Userspace TCP delay proxy: a netem substitute for this kernel (no sch_netem).

    delayproxy.py --listen 127.0.0.1:PORT --target HOST:PORT --delay-us D

Each accepted connection is forwarded to the target; per direction a reader thread stamps every
chunk it receives and a writer thread sends it at stamp + D (one-way delay), so requests stay
pipelined (the delay adds latency, not a window). Python's wake-up jitter (tens of us on this VM)
comes on top: bench/run.sh reports the measured connect RTT through the proxy next to D.
SIGTERM/SIGINT stop it.
"""

import argparse
import collections
import signal
import socket
import sys
import threading
import time


def addr(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


def pump(src, dst, delay):
    q = collections.deque()
    cv = threading.Condition()
    done = [False]

    def reader():
        try:
            while True:
                b = src.recv(262144)
                if not b:
                    break
                with cv:
                    q.append((time.monotonic() + delay, b))
                    cv.notify()
        except OSError:
            pass
        with cv:
            done[0] = True
            cv.notify()

    def writer():
        try:
            while True:
                with cv:
                    while not q and not done[0]:
                        cv.wait()
                    if not q:
                        break
                    due, b = q.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(b)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, type=addr)
    ap.add_argument("--target", required=True, type=addr)
    ap.add_argument("--delay-us", type=int, default=0)
    a = ap.parse_args()
    delay = a.delay_us / 1e6
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(a.listen)
    ls.listen(64)
    while True:
        c, _ = ls.accept()
        try:
            t = socket.create_connection(a.target, timeout=5)
        except OSError as e:
            print(f"delayproxy: connect {a.target}: {e}", file=sys.stderr)
            c.close()
            continue
        t.settimeout(None)
        for s in (c, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pump(c, t, delay)
        pump(t, c, delay)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
