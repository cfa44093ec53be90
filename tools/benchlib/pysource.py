"""An SMTP load generator (aiosmtplib), used only when smtp-source is not installed.

Takes the subset of smtp-source's options the bench uses (-s -m -l -r -f -t
-M -d) and exits non-zero when any message was not accepted, so lost mail is
never hidden.  Usage: ``python -m benchlib.pysource [options] HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiosmtplib


def build_message(sender: str, recipients: list[str], size: int, seq: int) -> bytes:
    """Headers plus ``size`` bytes of body in 78-character lines, like smtp-source -l."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipients[0]}>\r\n"
        f"Subject: bench {seq}\r\nMessage-ID: <bench.{seq}@source.bench.test>\r\n\r\n"
    )
    line = b"X" * 78 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return head.encode() + body + b"\r\n"


def recipients_for(base: str, count: int) -> list[str]:
    if count == 1:
        return [base]
    return [f"{i}{base}" for i in range(1, count + 1)]


async def worker(args: argparse.Namespace, host: str, port: int, queue: asyncio.Queue[int]) -> int:
    rcpts = recipients_for(args.t, args.r)
    failures = 0
    client: aiosmtplib.SMTP | None = None
    while True:
        try:
            seq = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        try:
            if client is None:
                client = aiosmtplib.SMTP(
                    hostname=host, port=port, local_hostname=args.M, timeout=60, start_tls=False
                )
                await client.connect()
            message = build_message(args.f, rcpts, args.l, seq)
            errors, _ = await client.sendmail(args.f, rcpts, message)
            if errors:
                raise RuntimeError(f"recipients refused: {errors}")
        except Exception as exc:
            failures += 1
            print(f"pysource: message {seq}: {exc}", file=sys.stderr)
            client = None
            continue
        if not args.d:
            await client.quit()
            client = None
    if client is not None:
        await client.quit()
    return failures


async def run(args: argparse.Namespace) -> int:
    host, _, port = args.target.rpartition(":")
    queue: asyncio.Queue[int] = asyncio.Queue()
    for seq in range(args.m):
        queue.put_nowait(seq)
    results = await asyncio.gather(
        *(worker(args, host, int(port), queue) for _ in range(max(1, args.s)))
    )
    return sum(results)


def main() -> None:
    parser = argparse.ArgumentParser(prog="pysource")
    parser.add_argument("-s", type=int, default=1)
    parser.add_argument("-m", type=int, default=1)
    parser.add_argument("-l", type=int, default=0)
    parser.add_argument("-r", type=int, default=1)
    parser.add_argument("-f", default="foo@localhost")
    parser.add_argument("-t", default="foo@localhost")
    parser.add_argument("-M", default="localhost")
    parser.add_argument("-d", action="store_true")
    parser.add_argument("target")
    args = parser.parse_args()
    failures = asyncio.run(run(args))
    if failures:
        print(f"pysource: {failures} of {args.m} messages not accepted", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
