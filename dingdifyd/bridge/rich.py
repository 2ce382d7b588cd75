"""One answer as DingTalk shows it: the raw Dify text rendered (reasoning per `show_reasoning`, markdown adapted,
bridge/markdown.py), with Dify's images and files brought over (bridge/media.py). What the bridge service calls
while the answer streams and when it ends."""

from __future__ import annotations

from dingdifyd.bridge.markdown import AnswerStyle, neutralise_links, render_answer
from dingdifyd.bridge.media import MediaTransfers, OutgoingMedia
from dingdifyd.bridge.ports import DifyFiles, MessageFiles
from dingdifyd.config import BotConfig
from dingdifyd.dify.events import DifyEvent, MessageEnd, MessageFile, WorkflowFinished
from dingdifyd.models import IncomingMessage


class RichAnswer:
    def __init__(
        self,
        *,
        bot: BotConfig,
        message: IncomingMessage,
        dify: object,
        files: MessageFiles | None,
        transfers: MediaTransfers | None = None,
    ):
        shown = bot.presentation
        self.style = AnswerStyle(show_reasoning=shown.show_reasoning, tables=shown.markdown_tables)
        self.media = OutgoingMedia(
            message=message,
            # the routed app's own host (a route may use another Dify), like DifySettings.public_base
            public_base=_without_v1(getattr(dify, "base_url", "")) or bot.dify.public_base,
            origins=getattr(dify, "file_origins", ()),  # the only other origin files are fetched from
            dify=dify if isinstance(dify, DifyFiles) else None,
            chat=files,
            delivery=shown.image_delivery,
            transfers=transfers,
        )

    def view(self, raw: str) -> str:
        """The card text for the answer so far. Links are made safe last, once images are DingTalk media."""
        return neutralise_links(self.media.card_text(render_answer(raw, self.style, final=False)))

    def see(self, event: DifyEvent) -> None:
        """Files Dify sends beside the text: `message_file` events, workflow file outputs, and 1.x's `files` of
        `message_end` and `workflow_finished`. One file named in several places (and as a markdown image in the
        text, signed differently) is one file: its path is its key (bridge/media.py)."""
        if isinstance(event, MessageFile) and event.belongs_to != "user":
            self.media.add_file(event.url, event.file_type)
        elif isinstance(event, MessageEnd) and event.files:
            self.media.add_outputs({"files": list(event.files)})
        elif isinstance(event, WorkflowFinished):
            self.media.add_outputs(event.outputs)
            if event.files:
                self.media.add_outputs({"files": list(event.files)})

    async def final(self, raw: str) -> str:
        """The card's final text, once every image is uploaded (or given up on)."""
        return neutralise_links(await self.media.final_text(render_answer(raw, self.style, final=True)))

    def after_card(self) -> list[dict[str, str]]:
        """The messages that follow the card (images, files), as data: see media.send_after_card."""
        return self.media.after_card()

    async def aclose(self) -> None:
        await self.media.aclose()


def _without_v1(api_url: object) -> str:
    url = str(api_url or "").rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
