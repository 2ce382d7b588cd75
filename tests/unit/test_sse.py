"""SSE block splitting and parsing, fed the bytes of real Dify 0.15.3 streams cut at every possible place."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator

import pytest

from dingdifyd.dify.sse import SSEBlockSplitter, SSEMessage, iter_sse, parse_block
from tests.support.transcripts import DIFY_0_15_FIXTURES

FIXTURES = DIFY_0_15_FIXTURES


def transcript(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def expected_blocks(raw: bytes, separator: bytes = b"\n\n") -> list[bytes]:
    return [part + separator for part in raw.split(separator) if part]


def split_all(chunks: list[bytes]) -> list[bytes]:
    splitter = SSEBlockSplitter()
    blocks: list[bytes] = []
    for chunk in chunks:
        blocks.extend(splitter.feed(chunk))
    return blocks + splitter.flush()


def messages_of(blocks: list[bytes]) -> list[SSEMessage]:
    return [message for block in blocks for message in parse_block(block)]


def test_whole_transcript_in_one_chunk_gives_one_block_per_event() -> None:
    raw = transcript("20-chat-stream-new.sse")
    blocks = split_all([raw])
    assert blocks == expected_blocks(raw)
    assert len(blocks) == 20  # message×19, message_end


def test_every_two_chunk_split_of_a_real_stream_gives_the_same_blocks() -> None:
    raw = transcript("20-chat-stream-new.sse")
    expected = expected_blocks(raw)
    for cut in range(len(raw) + 1):
        assert split_all([raw[:cut], raw[cut:]]) == expected, f"split at byte {cut}"


def test_one_byte_at_a_time_with_pings() -> None:
    raw = transcript("38-chat-stream-slow-with-pings.sse")
    blocks = split_all([raw[i : i + 1] for i in range(len(raw))])
    assert blocks == expected_blocks(raw)
    assert blocks.count(b"event: ping\n\n") == 2


@pytest.mark.parametrize("seed", range(20))
def test_random_split_points(seed: int) -> None:
    raw = transcript("89-workflow-stream-slow-with-pings.sse")
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 200)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert split_all(chunks) == expected_blocks(raw)


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_endings_parse_like_lf(line_end: bytes) -> None:
    raw = transcript("38-chat-stream-slow-with-pings.sse")
    converted = raw.replace(b"\n", line_end)
    reference = messages_of(split_all([raw]))
    one_byte = split_all([converted[i : i + 1] for i in range(len(converted))])
    # a block may end at the CR of its final CRLF: the event is complete there; the LF is a dropped blank line
    stripped = [block.rstrip(b"\r\n") for block in one_byte]
    assert stripped == [block.rstrip(b"\r\n") for block in expected_blocks(converted, line_end + line_end)]
    assert messages_of(one_byte) == reference
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(converted)), 300))
    chunks = [converted[a:b] for a, b in zip([0, *cuts], [*cuts, len(converted)], strict=True)]
    assert messages_of(split_all(chunks)) == reference


def test_a_cr_at_the_end_of_a_chunk_waits_for_a_possible_lf() -> None:
    splitter = SSEBlockSplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\ndata: b\r\n") == []  # the LF completed a CRLF; it is not a blank line
    blocks = splitter.feed(b"\r\n")
    assert blocks == [b"data: a\r\ndata: b\r\n\r\n"]
    assert messages_of(blocks) == [SSEMessage(event="message", data="a\nb")]


def test_a_crlf_event_is_complete_at_its_last_cr() -> None:
    # no waiting for the LF: with pings every 10 s the event would otherwise be late by up to 10 s
    splitter = SSEBlockSplitter()
    blocks = splitter.feed(b'data: {"n": 1}\r\n\r')
    assert messages_of(blocks) == [SSEMessage(event="message", data='{"n": 1}')]
    assert splitter.feed(b'\ndata: {"n": 2}\r\n\r\n') == [b'data: {"n": 2}\r\n\r\n']


def test_multibyte_utf8_split_inside_a_character() -> None:
    obj = {"event": "message", "answer": "你好, Dify 👋"}
    block = f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
    for cut in range(len(block) + 1):
        blocks = split_all([block[:cut], block[cut:]])
        assert blocks == [block]
        assert json.loads(messages_of(blocks)[0].data)["answer"] == "你好, Dify 👋"


def test_ping_blocks_give_no_message() -> None:
    assert parse_block(b"event: ping\n\n") == []
    assert parse_block(b": a comment\n\n") == []
    stream = b"event: ping\n\n" + b'data: {"event": "message"}\n\n' + b"event: ping\n\n"
    blocks = split_all([stream])
    assert len(blocks) == 3
    assert messages_of(blocks) == [SSEMessage(event="message", data='{"event": "message"}')]


def test_trailing_partial_block_is_parsed_at_eof() -> None:
    splitter = SSEBlockSplitter()
    assert splitter.feed(b'data: {"n": 1}\n\ndata: {"n": 2}') == [b'data: {"n": 1}\n\n']
    rest = splitter.flush()
    assert rest == [b'data: {"n": 2}']
    assert messages_of(rest) == [SSEMessage(event="message", data='{"n": 2}')]
    assert splitter.flush() == []


def test_blank_lines_between_blocks_are_dropped() -> None:
    splitter = SSEBlockSplitter()
    assert splitter.feed(b"\n\n\r\ndata: x\n\n\n\n") == [b"data: x\n\n"]
    assert splitter.flush() == []


def test_event_name_id_and_multiline_data() -> None:
    messages = parse_block(b"event: custom\nid: 7\ndata: line1\ndata: line2\n\n")
    assert messages == [SSEMessage(event="custom", data="line1\nline2", id="7")]


def test_invalid_utf8_block_is_skipped() -> None:
    assert parse_block(b"data: \xff\xfe\n\n") == []


async def test_iter_sse_yields_events_from_an_async_byte_stream() -> None:
    raw = transcript("36-chat-stream-stopped.sse")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 37):
            yield raw[i : i + 37]
        yield b'data: {"event": "cut'  # a stream cut in the middle of an event

    messages = [message async for message in iter_sse(chunks())]
    events = [json.loads(m.data)["event"] for m in messages[:-1]]
    assert events == ["message", "message", "message", "message_end"]
    assert messages[-1].data == '{"event": "cut'
