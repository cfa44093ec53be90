"""A tiny HTTPS server on loopback that serves an MTA-STS policy, for tests.

It is real HTTP/1.1 over real TLS (a trustme certificate for
``mta-sts.<domain>``), so the relay's httpx client, its certificate checks
and its timeout are exercised as they are against a real web server::

    async with PolicyServer(pki_ca, "dest.test", POLICY) as web:
        ... outbound.ini: mta_sts_port = web.port, mta_sts_ca_file = <ca.pem> ...
        assert web.requests == ["/.well-known/mta-sts.txt"]

Attributes a test may change at any time: ``body`` (text), ``status``,
``content_type``, ``silent`` (accept the request and never answer: a fetch
that times out).  ``requests`` lists the paths asked for, ``hosts`` the
Host headers.  Binds 127.0.0.1 only, on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from types import TracebackType

import trustme

HOST = "127.0.0.1"


class PolicyServer:
    """Serves ``body`` at any path over HTTPS with a certificate for ``mta-sts.<domain>``."""

    def __init__(self, ca: trustme.CA, domain: str, body: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(f"mta-sts.{domain}").configure_cert(self.context)
        self.body = body
        self.status = 200
        self.content_type = "text/plain"
        self.silent = False
        self.requests: list[str] = []
        self.hosts: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> PolicyServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0, ssl=self.context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            lines = request.decode("latin-1").split("\r\n")
            self.requests.append(lines[0].split(" ")[1])
            self.hosts += [line.split(":", 1)[1].strip() for line in lines[1:] if
                           line.lower().startswith("host:")]  # fmt: skip
            if self.silent:
                await asyncio.sleep(30)
                return
            body = self.body.encode()
            head = (
                f"HTTP/1.1 {self.status} X\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, TimeoutError):
            return  # the client went away: nothing more to serve
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.transport.abort()  # no close_notify exchange that could hang teardown
