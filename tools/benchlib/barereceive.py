"""A bare aiosmtpd server that answers 250 to DATA at once: the receive limit.

``tools/limits`` runs it under smtp-source to measure what aiosmtpd alone
costs on this machine: no spool, no fsync, no policy, no logging, so
whatever outboundd's listener spends beyond this figure is ours.  With
``--procs N`` the listening socket is bound once and N processes accept
on it, as outboundd's ``nodes`` do; with ``--uvloop`` each process runs
uvloop, as outboundd does when it is installed.  The garbage collector is
tuned as outboundd tunes it, so the comparison is of the code, not of the
collector's settings.

Usage: ``python -m benchlib.barereceive [--uvloop] [--procs N] HOST:PORT``.
Stops on SIGTERM or SIGINT (the whole process group, as the bench sends it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP

#: outboundd's young-generation threshold (``outboundd.daemon.GC_THRESHOLD``).
GC_THRESHOLD = (10_000, 20, 20)
HOSTNAME = "limits.bench.test"
REPLY = "250 2.0.0 Ok: accepted"


class AcceptAll:
    """The whole handler: every message is accepted and dropped at once."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return REPLY


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(sock: socket.socket) -> None:
    """Accept on ``sock`` until SIGTERM/SIGINT."""
    handler = AcceptAll()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, enable_SMTPUTF8=True, decode_data=False),
        sock=sock,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    import uvloop

    return uvloop.new_event_loop


def run_node(sock: socket.socket, use_uvloop: bool) -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        runner.run(serve(sock))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="barereceive")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("target")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    sock = listening_socket(host, int(port))
    loop_factory(args.uvloop)  # import uvloop before forking, once
    children: list[int] = []
    for _ in range(max(1, args.procs) - 1):
        pid = os.fork()
        if pid == 0:
            try:
                run_node(sock, args.uvloop)
            finally:
                os._exit(0)
        children.append(pid)
    try:
        run_node(sock, args.uvloop)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
