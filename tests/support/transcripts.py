"""The recorded Dify transcripts (tests/fixtures/dify for 0.15.3, tests/fixtures/dify-1.16.1 for 1.16.1), as the
tests that hold the fake Dify and the client to them read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dingdifyd.dify.sse import SSEBlockSplitter, parse_block

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIFY_0_15_FIXTURES = FIXTURES / "dify"
DIFY_1_16_FIXTURES = FIXTURES / "dify-1.16.1"


def recorded_answer(fixtures: Path, case: str) -> tuple[int, bytes]:
    """The recorded answer of a case: its HTTP status and its body (`.json`, else `.sse`)."""
    status = int((fixtures / f"{case}.headers").read_text().split()[1])
    body_file = next(fixtures.glob(f"{case}.json"), None) or fixtures / f"{case}.sse"
    return status, body_file.read_bytes()


def chunks_of(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects of an SSE body's `data:` lines, in order (pings have none)."""
    splitter = SSEBlockSplitter()
    blocks = splitter.feed(raw) + splitter.flush()
    return [json.loads(message.data) for block in blocks for message in parse_block(block)]


def shape(value: Any) -> Any:
    """The keys of every object, in order, recursively; values are ignored."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    return None
