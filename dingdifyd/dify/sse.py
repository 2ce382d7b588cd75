"""Server-sent events over an asynchronous byte stream.

The network hands us chunks that end anywhere: inside a line, between the two line breaks that close an
event, inside a multi-byte UTF-8 character. `SSEBlockSplitter` turns them into complete event blocks without
any I/O; each block is then parsed by sseclient-py's parser, which only ever sees whole blocks. Decoding
happens per block, so a character split across two chunks is whole again by then (CR and LF never occur
inside a UTF-8 multi-byte sequence).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass

import sseclient

log = logging.getLogger(__name__)

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class SSEMessage:
    """One dispatched event. `event` is "message" when the block had no `event:` line (Dify's data chunks)."""

    event: str
    data: str
    id: str | None = None


class SSEBlockSplitter:
    """Accumulates bytes and cuts them into event blocks; a block ends at a blank line (CRLF, LF or CR).

    Each returned block includes its terminating line breaks. Blank lines between blocks are dropped.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line_start = 0  # where the current, not yet terminated line of the current block starts
        self._search_from = 0  # bytes before this have been searched for a line end already

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        blocks: list[bytes] = []
        while True:
            match = _LINE_END.search(self._buffer, self._search_from)
            if match is None:
                self._search_from = len(self._buffer)
                break
            is_blank_line = match.start() == self._line_start
            if not is_blank_line and match.group() == b"\r" and match.end() == len(self._buffer):
                # a CR at the very end may be the first half of a CRLF, and taking it alone would make the LF
                # look like a blank line: wait for the next byte. (After a blank line it does not matter: a
                # stray LF before the next block is a blank line that is dropped.)
                self._search_from = match.start()
                break
            if is_blank_line:
                if self._line_start > 0:
                    blocks.append(bytes(self._buffer[: match.end()]))
                del self._buffer[: match.end()]
                self._line_start = self._search_from = 0
            else:
                self._line_start = self._search_from = match.end()
        return blocks

    def flush(self) -> list[bytes]:
        """At end of input: whatever is left (a block cut before its blank line) is still a block."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._line_start = self._search_from = 0
        return [rest] if rest.strip(b"\r\n") else []


def parse_block(block: bytes) -> list[SSEMessage]:
    """Parse one complete block with sseclient-py. A block without data (`event: ping`) gives nothing."""
    try:
        return [
            SSEMessage(event=event.event, data=event.data, id=event.id)
            for event in sseclient.SSEClient(iter([block])).events()
        ]
    except UnicodeDecodeError:
        log.warning("skipping an SSE block that is not valid UTF-8 (%d bytes)", len(block))
        return []


async def iter_sse(chunks: AsyncIterable[bytes]) -> AsyncGenerator[SSEMessage, None]:
    """Yield each event of a byte stream as soon as its block is complete; a cut-off last block counts too."""
    splitter = SSEBlockSplitter()
    async for chunk in chunks:
        for block in splitter.feed(chunk):
            for message in parse_block(block):
                yield message
    for block in splitter.flush():
        for message in parse_block(block):
            yield message
