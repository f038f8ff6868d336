"""A TCP relay: `python -m ditforge.relay LISTEN_HOST LISTEN_PORT TARGET_PORT`.

Why: `weed mini` has one bind address for all of its ports (master, volume, filer, WebDAV,
Iceberg, Lance, admin and their gRPC twins, most without authentication), so serving S3 beyond
loopback by binding it to 0.0.0.0 would open them all. Instead SeaweedFS stays on 127.0.0.1 and
this relay forwards only the S3 port (which checks its keys on every request) to other machines.
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def _serve(host: str, port: int, target: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, tw), _pipe(tr, w))

    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    print(f"relay {host}:{port} -> 127.0.0.1:{target}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
