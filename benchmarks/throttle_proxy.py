"""A TCP proxy that caps each connection at N MB/s per direction, as cloud stores cap a stream.

    python benchmarks/throttle_proxy.py --upstream 127.0.0.1:8333 --mbps 10 [--port 0]

Prints ``ready <port>`` once listening; on SIGTERM or SIGINT prints one JSON line with what
it carried (connections, bytes each way, the most connections open at once) and exits.
Each direction of each connection is paced on its own (no credit for idle time: a
connection that was idle never bursts above the cap).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

CHUNK = 64 * 1024


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.peak_open = 0
        self.up = 0  # client -> server bytes
        self.down = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "peak_open": self.peak_open,
            "bytes_up": self.up,
            "bytes_down": self.down,
        }


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    rate: float,
    count: Callable[[int], None],
) -> None:
    loop = asyncio.get_running_loop()
    due = loop.time()
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
            count(len(data))
            due = max(due, loop.time()) + len(data) / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(upstream: tuple[str, int], rate: float, port: int, stats: Stats) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        stats.open += 1
        stats.peak_open = max(stats.peak_open, stats.open)
        try:
            s_reader, s_writer = await asyncio.open_connection(*upstream)
        except OSError:
            c_writer.close()
            stats.open -= 1
            return

        def up(n: int) -> None:
            stats.up += n

        def down(n: int) -> None:
            stats.down += n

        try:
            await asyncio.gather(
                _pipe(c_reader, s_writer, rate, up), _pipe(s_reader, c_writer, rate, down)
            )
        except asyncio.CancelledError:  # shutting down
            pass
        finally:
            stats.open -= 1

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(json.dumps(stats.as_dict()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the server")
    parser.add_argument("--mbps", type=float, default=10.0, help="MB/s (10^6) per direction")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve((host, int(port)), args.mbps * 1e6, args.port, Stats()))


if __name__ == "__main__":
    main()
