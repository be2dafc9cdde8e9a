"""Reading request bodies with a hard size limit, so a huge or endless body can't exhaust memory.

Stops reading at limit + 1 bytes; it never buffers more than that.
"""

from __future__ import annotations

from aiohttp import web

from shipyard.errors import PayloadTooLarge


async def read_limited(request: web.Request, limit: int, *, what: str = "request body") -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"{what} exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(min(65536, limit + 1 - size) or 1)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} exceeds {limit} bytes")
        chunks.append(chunk)
