"""What the bridge needs from the outside, as protocols. The DingTalk and Dify adapters provide them, and so do
the terminal chat (`dingdifyd chat`) and the demo's renderer."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

from dingdifyd.dify.events import DifyEvent
from dingdifyd.models import IncomingMessage


class CardSink(Protocol):
    """One reply card that a growing answer streams into. Each method makes one call (the card scheduler gives
    turns to calls); a failure is a PeerError whose `retryable` and `rate_limited` say what the streamer does."""

    @property
    def available(self) -> bool:
        """False: do not even try to create this card (cards are off for a while); answer with a plain reply."""
        ...

    async def open(self) -> None:
        """Create the card. Raises CardAlreadyExists when it exists already: an earlier process created it (the
        answer is resumed), or an earlier attempt did before it seemed to fail."""
        ...

    async def update(self, text: str) -> None: ...
    async def finish(self, text: str) -> None: ...
    async def fail(self, text: str) -> None: ...

    def fall_back(self, exc: Exception) -> bool:
        """`open` failed for good with `exc`: switch to another way of showing the card (e.g. another template)
        and return True to have that created instead, or return False to give up on the card."""
        ...


class ReplyChannel(Protocol):
    """How answers reach the person: a card per message, and a plain reply when no card can be written."""

    def card(self, message: IncomingMessage, out_track_id: str) -> CardSink: ...
    async def plain_reply(self, message: IncomingMessage, markdown: str) -> None: ...


class AnswerSource(Protocol):
    """The Dify app. Raises the project's DifyError family; yields typed events up to the terminal one."""

    def stream_answer(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str | None = None,
        inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[DifyEvent, None]: ...


@runtime_checkable
class DifyFiles(Protocol):
    """The Dify app's file side: its upload settings, uploads, and the files it serves (signed URLs)."""

    async def parameters(self) -> dict[str, Any]: ...
    async def upload_file(self, *, data: bytes, filename: str, mime_type: str, user: str) -> dict[str, Any]: ...
    async def fetch_file(self, url: str) -> tuple[bytes, str]: ...  # (bytes, content type)
    async def resolved_app_type(self) -> str: ...


class MessageFiles(Protocol):
    """DingTalk's file side: what a person sent, the media store, and messages sent after the card."""

    async def download(self, message: IncomingMessage, download_code: str) -> bytes: ...
    async def upload(self, data: bytes, *, filename: str, content_type: str, kind: str) -> str: ...  # media id
    async def send_image(self, message: IncomingMessage, photo_url: str) -> None: ...
    async def send_file(self, message: IncomingMessage, media_id: str, filename: str) -> None: ...
