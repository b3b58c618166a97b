"""A TCP proxy that holds every byte for a fixed delay in each direction: the latency of a
real link, where the kernel's tc has no netem.

    with DelayProxy(("10.1.2.1", 0), ("127.0.0.1", broker_port), delay=0.001) as proxy:
        ...  # clients connect to proxy.host:proxy.port instead of the broker

Each chunk read from one side is written to the other `delay` seconds after it arrived, in
the order it arrived (one queue per direction); a round trip through the proxy gains
2 x delay, plus the proxy's own forwarding (~0.1-0.2 ms on loopback). TCP_NODELAY is set on
both sockets of every connection, so the proxy adds no coalescing delay of its own.

Timers fire late: asyncio.sleep(0.005) wakes ~0.3 ms late on a busy 2-core machine, which
would add that to every hold. The proxy keeps a running average of its timers' lateness and
wakes that much earlier, so holds are `delay` on average (a single one may be ~0.1 ms off
either way; in a bulk transfer chunks also queue behind the receiver, as on a real link:
an 8 MB echo held 2.7 ms on average for 2 ms). The event loop runs on a select()
selector: epoll and poll take their timeouts in whole milliseconds, rounded up; select()
takes microseconds (and fds below 1024: plenty for a benchmark). Half-closes are forwarded
after the delay too; a reset closes both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
from types import TracebackType

_EOF = b""
QUEUE_CHUNKS = 256  # chunks held per direction before reading pauses (flow control)
LATE_GAIN = 0.05  # weight of each new sample in the timer lateness average


class DelayProxy:
    """The proxy on its own event loop in a background thread: start() returns once it
    listens (on `listen`; port 0 picks a free one, see `port`), stop() closes every
    connection and joins the thread. Also a context manager."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
        if delay < 0:
            raise ValueError(f"delay must be 0 or more seconds, not {delay}")
        self.listen = listen
        self.target = target
        self.delay = delay
        self.host, self.port = listen
        self.connections = 0  # accepted so far
        self._late = 0.0  # how late the loop's timers fire, on average (s): woken that early
        self._held = 0  # chunks forwarded
        self._held_s = 0.0  # the time they were held, summed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._failed: BaseException | None = None

    def start(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise RuntimeError(f"delay proxy on {self.listen} failed: {self._failed!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def mean_hold(self) -> float:
        """How long forwarded chunks were held, on average so far (s): `delay`, give or take
        the timers' jitter."""
        return self._held_s / self._held if self._held else 0.0

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._failed = e
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.ensure_future(self._pipe(reader, writer))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        server = await asyncio.start_server(accepted, *self.listen)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One client connection: a connection to the target and one delayed stream each
        way, until both directions have ended or either side fails."""
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._direction(client_r, server_w))
                group.create_task(self._direction(server_r, client_w))
        except* OSError:  # a reset on either side ends the connection
            pass
        finally:
            for w in (client_w, server_w):
                w.close()

    async def _direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction: read, stamp, and write each chunk when its delay is up."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            while True:
                data = await reader.read(1 << 16)
                await held.put((loop.time() + self.delay, data))
                if data == _EOF:
                    return

        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            while True:
                due, data = await held.get()
                wait = due - loop.time() - self._late
                if wait > 0:
                    await asyncio.sleep(wait)
                    late = loop.time() - (due - self._late)  # the timer's own lateness
                    self._late += LATE_GAIN * (min(late, self.delay / 2) - self._late)
                if data == _EOF:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                self._held += 1
                self._held_s += loop.time() - (due - self.delay)
                writer.write(data)
                await writer.drain()
