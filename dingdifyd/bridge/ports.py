"""What the bridge needs from the outside, as protocols. The DingTalk and Dify adapters provide them, and so do
the terminal chat (`dingdifyd chat`) and the demo's renderer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from dingdifyd.bridge.models import IncomingMessage
from dingdifyd.dify.events import DifyEvent


class CardSink(Protocol):
    """One reply card that a growing answer streams into."""

    async def open(self) -> None: ...
    async def update(self, text: str) -> None: ...
    async def finish(self, text: str) -> None: ...
    async def fail(self, text: str) -> None: ...


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
    ) -> AsyncIterator[DifyEvent]: ...
