"""A bare aiosmtplib client loop: the send limit.

``tools/limits`` runs it against smtp-sink to measure what aiosmtplib alone
costs on this machine: the message is built once, there is no queue, no
MX lookup and no record, so whatever outboundd's delivery spends beyond
this figure is ours.  ``--concurrency`` connections run in parallel; each
sends one message and quits (outboundd's first message to a host) or, with
``--reuse``, sends message after message on one connection (outboundd's
pooled connections).  aiosmtplib's ``sendmail`` waits for each reply in
turn (MAIL, RCPT, DATA, the body): it does not pipeline, which outboundd's
own DATA phase does.

With ``--procs N`` the work is split over N forked processes.  Each
process measures its own CPU (``getrusage``) and end time around the
sending loop only, so start-up and imports are not counted; the result is
one JSON line on stdout: messages sent, failures, wall seconds from the
common start to the last process's end, and the CPU seconds of all.

Usage: ``python -m benchlib.baresend [--reuse] [--uvloop] [--procs N]
[--concurrency C] [--messages N] [--size B] HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib

from benchlib.pysource import build_message

SENDER = "limits@source.bench.test"
RECIPIENT = "rcpt@dest.bench.test"
HELO_NAME = "limits.bench.test"


async def connection(
    host: str, port: int, message: bytes, take: Callable[[], bool], reuse: bool
) -> tuple[int, int]:
    """Send messages while ``take()`` grants one; returns (sent, failed)."""
    sent = failed = 0
    client: aiosmtplib.SMTP | None = None
    while take():
        try:
            if client is None:
                client = aiosmtplib.SMTP(
                    hostname=host, port=port, local_hostname=HELO_NAME, timeout=30, start_tls=False
                )
                await client.connect()
            await client.sendmail(SENDER, [RECIPIENT], message)
            sent += 1
            if not reuse:
                await client.quit()
                client = None
        except (aiosmtplib.SMTPException, OSError) as exc:
            failed += 1
            print(f"baresend: {exc}", file=sys.stderr)
            client = None
    if client is not None:
        await client.quit()
    return sent, failed


async def send_all(
    host: str, port: int, messages: int, concurrency: int, size: int, reuse: bool
) -> tuple[int, int]:
    message = build_message(SENDER, [RECIPIENT], size, 0)
    left = messages

    def take() -> bool:
        nonlocal left
        if left <= 0:
            return False
        left -= 1
        return True

    results = await asyncio.gather(
        *(connection(host, port, message, take, reuse) for _ in range(max(1, concurrency)))
    )
    return sum(r[0] for r in results), sum(r[1] for r in results)


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_share(args: argparse.Namespace, messages: int, concurrency: int) -> dict[str, Any]:
    """One process's part: its loop, its CPU and its end time."""
    host, _, port = args.target.rpartition(":")
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    cpu0 = cpu_now()
    with asyncio.Runner(loop_factory=factory) as runner:
        sent, failed = runner.run(
            send_all(host, int(port), messages, concurrency, args.size, args.reuse)
        )
    return {"sent": sent, "failed": failed, "cpu": cpu_now() - cpu0, "end": time.monotonic()}


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baresend")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("target")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop  # noqa: F401  (imported before the fork, once)
    procs = max(1, args.procs)
    pipes: list[tuple[int, int]] = []
    t0 = time.monotonic()
    for messages, concurrency in zip(
        split(args.messages, procs), split(max(procs, args.concurrency), procs), strict=True
    ):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            code = 1
            try:
                result = run_share(args, messages, concurrency)
                os.write(write_fd, json.dumps(result).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        pipes.append((pid, read_fd))
    shares = []
    for pid, read_fd in pipes:
        with os.fdopen(read_fd, "rb") as fh:
            data = fh.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not data:
            print(f"baresend: sender process {pid} failed", file=sys.stderr)
            return 1
        shares.append(json.loads(data))
    report = {
        "sent": sum(s["sent"] for s in shares),
        "failed": sum(s["failed"] for s in shares),
        "cpu_seconds": sum(s["cpu"] for s in shares),
        "seconds": max(s["end"] for s in shares) - t0,
    }
    print(json.dumps(report), flush=True)
    return 0 if report["failed"] == 0 and report["sent"] == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
