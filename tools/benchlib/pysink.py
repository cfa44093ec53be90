"""A counting SMTP sink (aiosmtpd), used only when smtp-sink is not installed.

Prints ``mesg=N`` after every accepted message, like ``smtp-sink -c``.
Usage: ``python -m benchlib.pysink HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP


class CountingHandler:
    """Accepts every message and reports the running count on stdout."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        sys.stdout.write(f"sess=0 quit=0 mesg={self.count}\r")
        sys.stdout.flush()
        return "250 2.0.0 Ok: discarded"


async def serve(host: str, port: int) -> None:
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="pysink.bench.test", enable_SMTPUTF8=True), host, port
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    asyncio.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
