"""The files a person sends, on their way to Dify: fetched from DingTalk, uploaded to the app, placed in the
request where the app takes them (bridge/attachments.py decides where), with a clear word about each file that
could not go. What the app accepts comes from its `GET /parameters`, cached per app (bridge/apps.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from dingdifyd.bridge import attachments as att
from dingdifyd.bridge.apps import DifyApp
from dingdifyd.bridge.ports import DifyFiles, MessageFiles
from dingdifyd.config import BotConfig
from dingdifyd.errors import DifyAuthError, DifyError, DifyUnavailable, PeerError
from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)


NO_TEXT = "I can read text, voice, pictures and files. Please type your question."
VOICE_NOT_RECOGNISED = "I could not make out your voice message. Please try again, or type your question."
FILES_UNSUPPORTED = "Files and pictures cannot be passed on here, so {label} was not sent."
DOWNLOAD_FAILED = "I could not fetch {label} from DingTalk. Please send it again."
UPLOAD_REFUSED = "The AI app did not accept {label} ({reason})."
NO_FILE = "Please send a picture or a file."


@dataclass
class Question:
    """What to ask Dify for one message; with `reply` set, nothing: answer the person with `reply`."""

    query: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)  # file input variables of a workflow app
    notes: list[str] = field(default_factory=list)  # files that could not be sent, said after the answer
    reply: str | None = None


class IncomingFiles:
    """Turns a message's files into what its Dify app takes. One per bot; apps (routes) are told per call."""

    def __init__(self, *, bot: BotConfig, chat: MessageFiles | None):
        self.bot = bot
        self.chat = chat  # where the person chats: the files they sent

    async def prepare(self, message: IncomingMessage, text: str, *, user: str, app: DifyApp) -> Question:
        """The query, files and file inputs for this message to `app`. Raises DifyError only when the app
        cannot be asked at all (its settings unreadable, Dify unreachable): the card then says so as for any
        answer."""
        dify = app.client
        attachments = att.attachments_of(message)
        if not attachments:
            if text:
                return Question(query=text)
            return Question(reply=VOICE_NOT_RECOGNISED if message.msg_type == "audio" else NO_TEXT)
        if self.chat is None or not isinstance(dify, DifyFiles):
            notes = [FILES_UNSUPPORTED.format(label=a.label) for a in attachments]
            return Question(query=text, notes=notes) if text else Question(reply="\n\n".join(notes))

        params = await app.settings.get()
        if params is None:
            raise DifyUnavailable("the Dify app's settings (GET /parameters) could not be read to pass files on")
        rules = att.UploadRules.from_parameters(params.raw)
        placements = att.place_attachments(attachments, rules, await dify.resolved_app_type())
        question = Question()
        results = await asyncio.gather(
            *(self._send(message, dify, p, rules, user, index) for index, p in enumerate(placements))
        )
        sent_pictures: list[bool] = []
        for placement, result in zip(placements, results, strict=True):
            if placement.attachment.kind == att.KIND_PICTURE:
                sent_pictures.append(isinstance(result, dict))
            if isinstance(result, str):
                question.notes.append(result)
            elif placement.variable is None:
                question.files.append(result)
            elif placement.multiple:
                question.inputs.setdefault(placement.variable, []).append(result)
            else:
                question.inputs[placement.variable] = result
        sent = [p.attachment for p, r in zip(placements, results, strict=True) if isinstance(r, dict)]
        query = att.rich_text_query(message, sent_pictures).strip() if message.msg_type == "richText" else text
        if not sent:
            if query:
                question.query = query
            else:
                question.reply = "\n\n".join(question.notes)
            return question
        if not query:
            pictures_only = all(a.kind == att.KIND_PICTURE for a in sent)
            asked = self.bot.conversation
            query = asked.default_image_query if pictures_only else asked.default_file_query
        question.query = query
        log.info("message %s: %d file(s) passed to Dify, %d not", message.msg_id, len(sent), len(question.notes))
        return question

    async def upload_for_form(
        self,
        message: IncomingMessage,
        *,
        user: str,
        app: DifyApp,
        limit: int,
    ) -> list[dict[str, str]] | str:
        """The message's files (at most `limit`) uploaded for a human-input form's file field: their Dify file
        values, or why they could not be (a sentence for the person)."""
        dify = app.client
        attachments = att.attachments_of(message)[: max(limit, 1)]
        if not attachments:
            return NO_FILE
        if self.chat is None or not isinstance(dify, DifyFiles):
            return FILES_UNSUPPORTED.format(label=attachments[0].label)
        rules = att.UploadRules()  # the form field decides what it takes; sizes are Dify's defaults
        placements = [att.Placement(a, dify_type=a.dify_type) for a in attachments]
        results = await asyncio.gather(
            *(self._send(message, dify, p, rules, user, index) for index, p in enumerate(placements))
        )
        failed = next((r for r in results if isinstance(r, str)), None)
        if failed is not None:
            return failed
        return [r for r in results if isinstance(r, dict)]

    async def _send(
        self, message: IncomingMessage, dify: DifyFiles, placement: att.Placement, rules: att.UploadRules,
        user: str, index: int,
    ) -> dict[str, str] | str:
        """Fetch one file from DingTalk and upload it to Dify: its `files` entry, or why it was not sent."""
        if not placement.accepted:
            return placement.refusal
        assert self.chat is not None
        attachment = placement.attachment
        try:
            data = await self.chat.download(message, attachment.download_code)
        except PeerError as exc:
            log.warning("message %s: downloading %s failed: %s", message.msg_id, attachment.kind, exc)
            return DOWNLOAD_FAILED.format(label=attachment.label)
        limit = rules.size_limit(placement.dify_type)
        if len(data) > limit:
            return att.too_large(attachment, len(data), limit)
        name = attachment.name
        if attachment.kind == att.KIND_PICTURE:
            name = f"image-{index + 1}.{att.sniff_image_extension(data)}"
        try:
            uploaded = await dify.upload_file(data=data, filename=name, mime_type=att.mime_type_of(name), user=user)
        except DifyAuthError:
            raise
        except DifyError as exc:
            if exc.status not in (400, 413, 415):
                raise
            log.warning("message %s: Dify refused the upload of a %s: %s %s", message.msg_id, attachment.kind,
                        exc.status, exc.code)
            reason = "too large" if exc.status == 413 else "file type not supported" if exc.status == 415 else exc.code
            return UPLOAD_REFUSED.format(label=attachment.label, reason=reason or "refused")
        file_id = uploaded.get("id")
        if not isinstance(file_id, str) or not file_id:
            raise DifyError("Dify's /files/upload answered without a file id")
        return att.dify_file(placement.dify_type, file_id)
