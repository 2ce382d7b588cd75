"""Images and files from Dify, on their way to the DingTalk user, for one answer.

Dify gives them as `message_file` events, as markdown images in the answer (often relative, signed
`/files/tools/...` URLs: resolved against the Dify host without `/v1`), and as file objects in a workflow's
outputs. DingTalk cannot fetch Dify's URLs (internal host, signatures that expire in minutes), so each is fetched
from Dify and uploaded to DingTalk's media store as soon as it is seen, while the answer still streams. An image
then shows in the card as `![alt](@mediaId)` (or, with `image_delivery: message`, is sent as an image message
after the card); any other file is sent as a file message right after the card. Images on other hosts are left
to DingTalk to fetch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import mimetypes
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from dingdifyd.bridge import attachments as att
from dingdifyd.bridge import markdown
from dingdifyd.bridge.ports import DifyFiles, MessageFiles
from dingdifyd.errors import PeerError
from dingdifyd.models import IncomingMessage
from dingdifyd.origins import origin_of, origins_of

log = logging.getLogger(__name__)

# What DingTalk's media store takes as `image` (and a card shows); other images go as files.
DINGTALK_IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "bmp", "webp"})
MAX_FILE_BYTES = 20 * 1024 * 1024  # DingTalk's media upload limit

# One answer brings over at most this many images and files (each a download from Dify and an upload to
# DingTalk); a bot process moves at most MAX_TRANSFERS of them at a time, each at most MAX_FILE_BYTES, so the
# media it holds in memory stays below MAX_TRANSFERS x MAX_FILE_BYTES (twice that while one is being copied).
MAX_IMAGES_PER_ANSWER = 20
MAX_FILES_PER_ANSWER = 10
MAX_TRANSFERS = 3

IMAGE_FAILED = "🖼️ {alt} (could not be shown)"
FILE_FAILED = "The file “{name}” from the app could not be delivered."
FILE_SEND_FAILED = "⚠️ The file “{name}” from the app could not be sent here."
IMAGES_LEFT_OUT = "{count} more images from the app were left out (at most {limit} per answer)."
FILES_LEFT_OUT = "{count} more files from the app were left out (at most {limit} per answer)."

_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+);base64,(.+)$", re.DOTALL)


def dify_file_url(url: str, public_base: str, origins: Iterable[str] = ()) -> str | None:
    """The absolute URL to fetch when `url` is a file Dify serves, else None (a URL DingTalk can use as is).

    Dify's files are relative URLs, or absolute ones on Dify's own origin (scheme, host and port) or on one
    of `origins` (its FILES_URL host, when configured). A Dify-looking path on any other origin is not
    Dify's: the daemon never fetches it (a model can be made to write `http://169.254.169.254/files/...`)."""
    url = url.strip()
    if not url or url.startswith(("@", "data:")):
        return None
    parts = urlsplit(url)
    if not parts.scheme and not parts.netloc:
        path = url if url.startswith("/") else "/" + url
        return public_base.rstrip("/") + path
    allowed = origins_of([public_base, *origins])
    return url if origin_of(url) in allowed else None


def file_name_of(url: str, content_type: str = "", fallback: str = "file") -> str:
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) if not url.startswith("data:") else ""
    if name in ("file-preview", "image-preview"):
        name = ""
    if not att.extension_of(name):
        extension = mimetypes.guess_extension(content_type.split(";")[0].strip()) if content_type else None
        name = (name or fallback) + (extension or "")
    return name


def files_in_outputs(outputs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The file objects among a workflow run's outputs (single files and lists of files)."""
    found: list[Mapping[str, Any]] = []
    for value in outputs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping) and _is_dify_file(item):
                found.append(item)
    return found


def _is_dify_file(obj: Mapping[str, Any]) -> bool:
    if obj.get("dify_model_identity") == "__dify__file__":
        return True
    return "transfer_method" in obj and bool(obj.get("url") or obj.get("remote_url"))


@dataclass
class _Item:
    """One image or file: where it comes from and, once uploaded, its DingTalk media id."""

    key: str
    source: str  # the absolute URL to fetch, or a data: URL
    kind: str  # "image" | "file"
    name: str
    alt: str = ""
    task: asyncio.Task[str] | None = None
    media_id: str | None = None
    failed: bool = False


class MediaTransfers:
    """The transfers (a Dify download and its DingTalk upload) a bot process makes at a time, shared by all
    its answers: one answer with hundreds of images must not start hundreds of 20 MB downloads."""

    def __init__(self, limit: int = MAX_TRANSFERS):
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the process's own event loop

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        return self._slots


class OutgoingMedia:
    """The images and files of one answer. Rewrites the card text as uploads complete; sends files after it."""

    def __init__(
        self,
        *,
        message: IncomingMessage,
        public_base: str,
        dify: DifyFiles | None,
        chat: MessageFiles | None,
        delivery: str = "card",
        origins: Iterable[str] = (),
        transfers: MediaTransfers | None = None,
    ):
        self.message = message
        self.public_base = public_base
        self.origins = tuple(origins)  # where else Dify serves files (its FILES_URL host)
        self.dify = dify
        self.chat = chat  # where the person chats: its media store and messages
        self.delivery = delivery
        self.transfers = transfers or MediaTransfers()
        self._items: dict[str, _Item] = {}
        self._left_out: dict[str, set[str]] = {"image": set(), "file": set()}  # over the caps, by key
        self._extra: list[str] = []  # keys of images Dify sent as events or outputs, shown after the text
        self._files: list[str] = []  # keys of files sent after the card
        self._external_images: list[str] = []  # with delivery "message": images on other hosts, sent as they are

    @property
    def can_rehost(self) -> bool:
        return self.dify is not None and self.chat is not None

    # --- what Dify gave ---------------------------------------------------------------------------------

    def add_file(self, url: str, file_type: str = "", name: str = "") -> None:
        """A `message_file` event, or a file of a workflow's outputs."""
        source = dify_file_url(url, self.public_base, self.origins)
        if source is None:
            if url.startswith(("http://", "https://")) and file_type == "image":
                key = url
                if key not in self._extra:
                    self._extra.append(key)
                    self._items.setdefault(key, _Item(key, url, "external", name or "image"))
            return
        name = name or file_name_of(source, fallback="image" if file_type == "image" else "file")
        is_image = file_type == "image" and att.extension_of(name) in DINGTALK_IMAGE_EXTENSIONS | {""}
        item = self._item(source, "image" if is_image else "file", name)
        target = self._extra if is_image else self._files
        if item is not None and item.key not in target:
            target.append(item.key)

    def add_outputs(self, outputs: Mapping[str, Any]) -> None:
        for obj in files_in_outputs(outputs):
            url = str(obj.get("url") or obj.get("remote_url") or "")
            name = str(obj.get("filename") or "")
            self.add_file(url, str(obj.get("type") or ""), name)

    def _item(self, source: str, kind: str, name: str, alt: str = "") -> _Item | None:
        """The item of `source`, made (and its transfer started) on first sight; None when it is over the
        answer's cap for its kind (it is then left out, and the final text says how many were)."""
        key = _key_of(source)
        item = self._items.get(key)
        if item is None:
            cap = MAX_IMAGES_PER_ANSWER if kind == "image" else MAX_FILES_PER_ANSWER
            if sum(1 for other in self._items.values() if other.kind == kind) >= cap:
                self._left_out[kind].add(key)
                return None
            item = _Item(key, source, kind, name, alt)
            self._items[key] = item
            if self.can_rehost:
                item.task = asyncio.create_task(self._rehost(item), name=f"media-{key[-12:]}")
        return item

    async def _rehost(self, item: _Item) -> str:
        async with self.transfers.slots:
            return await self._transfer(item)

    async def _transfer(self, item: _Item) -> str:
        assert self.dify is not None and self.chat is not None
        if item.source.startswith("data:"):
            content_type = item.source[5:].split(";", 1)[0]
            decoded = decode_data_url(item.source)
            if decoded is None:
                raise PeerError("a data: URL that is not base64")
            data = decoded
        else:
            data, content_type = await self.dify.fetch_file(item.source)
        if len(data) > MAX_FILE_BYTES:
            raise PeerError(f"{len(data)} bytes: larger than DingTalk's media limit")
        name = item.name
        if not att.extension_of(name):
            extension = att.sniff_image_extension(data, "") if item.kind == "image" else ""
            if not extension and content_type:
                guessed = mimetypes.guess_extension(content_type.split(";")[0].strip())
                extension = guessed.lstrip(".") if guessed else ""
            name = f"{name}.{extension}" if extension else name
        kind = "image" if item.kind == "image" else "file"
        content_type = content_type or att.mime_type_of(name)
        media_id = await self.chat.upload(data, filename=name, content_type=content_type, kind=kind)
        item.name = name
        return media_id

    # --- the card text ----------------------------------------------------------------------------------

    def card_text(self, text: str, *, final: bool = False) -> str:
        """`text` (already adapted markdown) with Dify's images replaced by DingTalk media ids as they become
        ready; images still uploading are left out until they are. Starts uploads for new images."""
        self._collect()
        referenced: set[str] = set()

        def image(alt: str, url: str) -> str:
            if url.startswith("data:"):
                if not _DATA_URL.match(url):
                    return ""
                item = self._item(url, "image", "image", alt)
            else:
                source = dify_file_url(url, self.public_base, self.origins)
                if source is None:  # DingTalk fetches it itself
                    if self.delivery == "message" and url.startswith("https://"):
                        if url not in self._external_images:
                            self._external_images.append(url)
                        return ""
                    return f"![{alt}]({url})"
                if not self.can_rehost:
                    return f"![{alt}]({source})"
                item = self._item(source, "image", file_name_of(source, fallback="image"), alt)
            if item is None:
                return ""  # over the cap: left out, and counted in the final text
            referenced.add(item.key)
            return self._show(item, alt, final)

        text = markdown.replace_images(text, image)
        text = markdown.replace_links(text, self._absolute_link)
        extra = [self._show(self._items[k], "image", final) for k in self._extra if k not in referenced]
        extra = [piece for piece in extra if piece]
        if extra:
            text = "\n\n".join([text, *extra]) if text else "\n\n".join(extra)
        if final:
            lines = []
            for key in self._files:
                item = self._items[key]
                if item.failed:
                    lines.append("⚠️ " + FILE_FAILED.format(name=item.name))
                elif item.task is None:  # nothing can upload it (terminal chat): a plain link
                    lines.append(f"📎 [{item.name}]({item.source})")
            for kind, note, limit in (("image", IMAGES_LEFT_OUT, MAX_IMAGES_PER_ANSWER),
                                      ("file", FILES_LEFT_OUT, MAX_FILES_PER_ANSWER)):  # fmt: skip
                if self._left_out[kind]:
                    lines.append("⚠️ " + note.format(count=len(self._left_out[kind]), limit=limit))
            text = "\n\n".join(piece for piece in [text, *lines] if piece)
        return text

    def _collect(self) -> None:
        for item in self._items.values():
            task = item.task
            if task is not None and task.done() and item.media_id is None and not item.failed:
                if task.cancelled() or task.exception() is not None:
                    item.failed = True
                    exc = None if task.cancelled() else task.exception()
                    log.warning("message %s: %s from Dify not delivered: %s: %s",
                                self.message.msg_id, item.kind, type(exc).__name__, exc)
                else:
                    item.media_id = task.result()

    def _show(self, item: _Item, alt: str, final: bool) -> str:
        alt = alt or "image"
        if item.kind == "external":
            return f"![{alt}]({item.source})" if self.delivery == "card" else ""
        if item.media_id is not None:
            return f"![{alt}]({item.media_id})" if self.delivery == "card" else ""
        if item.failed and final:
            if item.source.startswith("data:"):
                return IMAGE_FAILED.format(alt=alt)
            return f"[{IMAGE_FAILED.format(alt=alt)}]({item.source})"
        if item.task is None:  # nothing can upload it (terminal chat): a plain link
            return f"![{alt}]({item.source})"
        return ""

    def _absolute_link(self, label: str, url: str) -> str:
        """A link to a Dify file (`[report](/files/...)`) must name Dify's host to work in DingTalk."""
        if url.startswith("/files/"):
            return f"[{label}]({self.public_base.rstrip('/')}{url})"
        return f"[{label}]({url})"

    # --- the end ----------------------------------------------------------------------------------------

    async def final_text(self, text: str) -> str:
        """The card's final text: every image in `text` and from Dify's events uploaded first (or given up)."""
        self.card_text(text)  # starts the uploads of images only the final text has
        tasks = [item.task for item in self._items.values() if item.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        return self.card_text(text, final=True)

    def after_card(self) -> list[dict[str, str]]:
        """What goes out after the card, in order, as plain data (kept with the answer in flight, so that a
        successor sends what was not sent): images (delivery "message") and files, one message each."""
        if self.chat is None:
            return []
        self._collect()
        sends: list[dict[str, str]] = []
        if self.delivery == "message":
            for item in self._items.values():
                if item.kind == "image" and item.media_id is not None:
                    sends.append({"kind": "image", "target": item.media_id, "name": item.name})
            for url in [*self._external_images, *(k for k in self._extra if self._items[k].kind == "external")]:
                sends.append({"kind": "image", "target": url, "name": url})
        for key in self._files:
            item = self._items[key]
            if item.media_id is not None:
                sends.append({"kind": "file", "target": item.media_id, "name": item.name})
        return sends

    async def aclose(self) -> None:
        """Stop uploads still running (the answer failed or was interrupted)."""
        tasks = [item.task for item in self._items.values() if item.task is not None and not item.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for item in self._items.values():  # retrieve, so no "exception was never retrieved" warnings
            if item.task is not None and item.task.done() and not item.task.cancelled():
                item.task.exception()


def _key_of(source: str) -> str:
    """Signed URLs of the same file differ in their query: the path names the file."""
    if source.startswith("data:"):
        return "data:" + hashlib.sha256(source.encode()).hexdigest()
    parts = urlsplit(source)
    return f"{parts.netloc}{parts.path}"


async def send_after_card(
    chat: MessageFiles,
    message: IncomingMessage,
    send: Mapping[str, str],
    plain_reply: Callable[[str], Awaitable[None]],
) -> None:
    """One of `OutgoingMedia.after_card()`'s messages; when DingTalk refuses it, the person is told instead."""
    name = str(send.get("name") or "")
    try:
        if send.get("kind") == "image":
            await chat.send_image(message, str(send["target"]))
        else:
            await chat.send_file(message, str(send["target"]), name)
    except PeerError as exc:
        log.warning("message %s: sending a file after the card failed: %s", message.msg_id, exc)
        with contextlib.suppress(PeerError):
            await plain_reply(FILE_SEND_FAILED.format(name=name.rsplit("/", 1)[-1]))


def decode_data_url(url: str) -> bytes | None:
    match = _DATA_URL.match(url)
    if match is None:
        return None
    try:
        return base64.b64decode(match.group(2), validate=False)
    except (binascii.Error, ValueError):
        return None
