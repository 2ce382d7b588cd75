"""Which files a DingTalk message carries, what the Dify app accepts, and where each file goes. Pure.

DingTalk gives pictures, videos and files by `downloadCode` (docs/dingtalk.md#robot-messages); a rich-text
message interleaves text and pictures. Dify takes uploaded files either in the request's `files` (chat,
completion, and workflow `sys.files`) or in a file input variable a workflow declares (`file` / `file-list` in
`user_input_form`), and only what `GET /parameters` allows: types, extensions, how many, how large
(docs/dify.md#files, docs/dify.md#app-info).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dingdifyd.models import IncomingMessage

# Dify 0.15's extension lists (api/constants/__init__.py); anything else is its "custom" type.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "mpeg", "mpga"})
AUDIO_EXTENSIONS = frozenset({"mp3", "m4a", "wav", "webm", "amr"})
DOCUMENT_EXTENSIONS = frozenset({
    "txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "docx", "csv",
    "doc", "eml", "msg", "pptx", "ppt", "xml", "epub",
})
DIFY_FILE_TYPES = ("image", "document", "audio", "video", "custom")

KIND_PICTURE = "picture"
KIND_VIDEO = "video"
KIND_FILE = "file"

MB = 1024 * 1024
# What Dify 0.15 applies when /parameters does not say (its UPLOAD_*_FILE_SIZE_LIMIT defaults, in MB).
_DEFAULT_SIZE_LIMITS_MB = {"image": 10, "video": 100, "audio": 50, "document": 15, "custom": 15}
_SIZE_LIMIT_KEYS = {"image": "image_file_size_limit", "video": "video_file_size_limit",
                    "audio": "audio_file_size_limit", "document": "file_size_limit", "custom": "file_size_limit"}
_TYPE_LABELS = {"image": "pictures", "document": "documents", "audio": "audio files", "video": "videos",
                "custom": "other files"}
_TYPE_SINGULAR = {"image": "picture", "document": "document", "audio": "audio file", "video": "video", "custom": "file"}


@dataclass(frozen=True)
class Attachment:
    """One file in a message, in message order."""

    kind: str  # picture | video | file
    download_code: str
    name: str = ""  # the file's name when DingTalk gives one (files), else ""
    extension: str = ""  # lower case, without the dot; "" for pictures until their bytes are seen

    @property
    def label(self) -> str:
        """How the person's file is named in a reply."""
        if self.kind == KIND_PICTURE:
            return "the picture"
        if self.kind == KIND_VIDEO:
            return "the video"
        return f"“{self.name}”" if self.name else "the file"

    @property
    def dify_type(self) -> str:
        if self.kind == KIND_PICTURE:
            return "image"
        return dify_type_of(self.extension)


def _str(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def attachments_of(message: IncomingMessage) -> list[Attachment]:
    """The files of a picture, richText, video or file message (voice is text: its `recognition`)."""
    content = message.content
    kind = message.msg_type
    if kind == "picture":
        code = _str(content.get("downloadCode")) or _str(content.get("pictureDownloadCode"))
        return [Attachment(KIND_PICTURE, code)] if code else []
    if kind == "richText":
        items = content.get("richText")
        found = []
        for item in items if isinstance(items, list) else ():
            if isinstance(item, Mapping) and _is_picture(item):
                code = _str(item.get("downloadCode")) or _str(item.get("pictureDownloadCode"))
                if code:
                    found.append(Attachment(KIND_PICTURE, code))
        return found
    if kind == "video":
        code = _str(content.get("downloadCode"))
        extension = (_str(content.get("videoType")) or "mp4").lower().lstrip(".")
        return [Attachment(KIND_VIDEO, code, f"video.{extension}", extension)] if code else []
    if kind == "file":
        code = _str(content.get("downloadCode"))
        name = _safe_name(_str(content.get("fileName"))) or "file"
        return [Attachment(KIND_FILE, code, name, extension_of(name))] if code else []
    return []


def _safe_name(name: str) -> str:
    """A file name fit for a multipart header: no path, quotes or control characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join("_" if ch in '"' or ord(ch) < 32 else ch for ch in name).strip()


def _is_picture(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "picture" or ("downloadCode" in item and "text" not in item)


def rich_text_query(message: IncomingMessage, sent_pictures: Sequence[bool]) -> str:
    """The text of a rich-text message with the pictures' places kept: `[image N]` where the N-th file sent
    to Dify stood, when there are several (with one, the order says nothing). Other messages: their text."""
    items = message.content.get("richText") if message.msg_type == "richText" else None
    if not isinstance(items, list) or sum(sent_pictures) < 2:
        return message.text
    parts: list[str] = []
    picture = 0
    number = 0
    for item in items:
        if not isinstance(item, Mapping):
            continue
        if _is_picture(item):
            if not (_str(item.get("downloadCode")) or _str(item.get("pictureDownloadCode"))):
                continue
            if picture < len(sent_pictures) and sent_pictures[picture]:
                number += 1
                parts.append(f"[image {number}]")
            picture += 1
            continue
        text = item.get("text")
        text = str(text).strip() if isinstance(text, str | int | float) and not isinstance(text, bool) else ""
        if text:
            parts.append(text)
    return "\n".join(parts)


# --- file names and types ----------------------------------------------------------------------------------


def extension_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[1].lower() if "." in base.strip(".") else ""


def dify_type_of(extension: str) -> str:
    extension = extension.lower().lstrip(".")
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in VIDEO_EXTENSIONS:
        return "video"
    if extension in AUDIO_EXTENSIONS:
        return "audio"
    if extension in DOCUMENT_EXTENSIONS:
        return "document"
    return "custom"


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff_image_extension(data: bytes, default: str = "jpg") -> str:
    """DingTalk pictures come without a name: tell their format by their first bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "heic"
    return default


def mime_type_of(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


# --- what the Dify app accepts -----------------------------------------------------------------------------


def _types(value: Any) -> frozenset[str]:
    return frozenset(str(v).lower() for v in value) if isinstance(value, list) else frozenset()


def _extensions(value: Any) -> frozenset[str]:
    return frozenset(str(v).lower().lstrip(".") for v in value) if isinstance(value, list) else frozenset()


def _methods_allow_local(value: Any) -> bool:
    # absent or empty: Dify does not restrict the transfer method
    return not isinstance(value, list) or not value or "local_file" in value


def _positive_int(value: Any, default: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


@dataclass(frozen=True)
class FileInput:
    """A workflow input variable of type `file` (one file) or `file-list`."""

    variable: str
    multiple: bool
    limit: int
    types: frozenset[str]
    extensions: frozenset[str]
    local_file: bool = True

    def accepts(self, dify_type: str, extension: str) -> str | None:
        """The Dify file type to send this file as, or None when this input does not take it."""
        return _accepting_type(self.types, self.extensions, dify_type, extension) if self.local_file else None


def _accepting_type(types: frozenset[str], extensions: frozenset[str], dify_type: str, extension: str) -> str | None:
    # Dify: a file of a listed type passes; else a "custom" file passes when its extension is listed (or none are)
    if dify_type != "custom" and dify_type in types:
        return dify_type
    if "custom" in types and (not extensions or extension in extensions):
        return "custom"
    return None


@dataclass(frozen=True)
class UploadRules:
    """The app's file settings, from `GET /parameters`."""

    enabled: bool = False
    types: frozenset[str] = frozenset()
    extensions: frozenset[str] = frozenset()
    limit: int = 0
    local_file: bool = True
    size_limits: Mapping[str, int] = field(default_factory=dict)  # bytes, per Dify file type
    file_inputs: tuple[FileInput, ...] = ()

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> UploadRules:
        upload = parameters.get("file_upload")
        upload = upload if isinstance(upload, Mapping) else {}
        image = upload.get("image")
        image = image if isinstance(image, Mapping) else {}
        if "enabled" in upload or "allowed_file_types" in upload:
            enabled = bool(upload.get("enabled"))
            types = _types(upload.get("allowed_file_types"))
            limit = _positive_int(upload.get("number_limits"), _positive_int(image.get("number_limits"), 3))
            local = _methods_allow_local(upload.get("allowed_file_upload_methods", image.get("transfer_methods")))
        else:  # before 0.10 only images existed: {"image": {"enabled", "number_limits", "transfer_methods"}}
            enabled = bool(image.get("enabled"))
            types = frozenset({"image"})
            limit = _positive_int(image.get("number_limits"), 3)
            local = _methods_allow_local(image.get("transfer_methods"))
        system = parameters.get("system_parameters")
        system = system if isinstance(system, Mapping) else {}
        size_limits = {
            kind: _positive_int(system.get(key), _DEFAULT_SIZE_LIMITS_MB[kind]) * MB
            for kind, key in _SIZE_LIMIT_KEYS.items()
        }
        return cls(
            enabled=enabled and bool(types),
            types=types,
            extensions=_extensions(upload.get("allowed_file_extensions")),
            limit=limit,
            local_file=local,
            size_limits=size_limits,
            file_inputs=tuple(_file_inputs(parameters.get("user_input_form"))),
        )

    def accepts(self, dify_type: str, extension: str) -> str | None:
        """The Dify file type to send this file as in `files`, or None when the app does not take it there."""
        if not (self.enabled and self.local_file):
            return None
        return _accepting_type(self.types, self.extensions, dify_type, extension)

    def accepted_labels(self) -> str:
        """What the app takes, for a reply: "pictures and documents"."""
        types = set(self.types) if self.enabled else set()
        for file_input in self.file_inputs:
            types |= file_input.types
        labels = [_TYPE_LABELS[t] for t in DIFY_FILE_TYPES if t in types]
        if not labels:
            return ""
        return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]

    def size_limit(self, dify_type: str) -> int:
        return self.size_limits.get(dify_type, _DEFAULT_SIZE_LIMITS_MB.get(dify_type, 15) * MB)


def _file_inputs(form: Any) -> list[FileInput]:
    inputs: list[FileInput] = []
    for item in form if isinstance(form, list) else ():
        if not isinstance(item, Mapping):
            continue
        for kind, spec in item.items():
            if kind not in ("file", "file-list") or not isinstance(spec, Mapping) or not spec.get("variable"):
                continue
            multiple = kind == "file-list"
            inputs.append(FileInput(
                variable=str(spec["variable"]),
                multiple=multiple,
                limit=_positive_int(spec.get("max_length"), 5) if multiple else 1,
                types=_types(spec.get("allowed_file_types")) or frozenset(DIFY_FILE_TYPES),
                extensions=_extensions(spec.get("allowed_file_extensions")),
                local_file=_methods_allow_local(spec.get("allowed_file_upload_methods")),
            ))
    return inputs


# --- where each file goes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one attachment goes: `variable` None means the request's `files`; `refusal` set means nowhere."""

    attachment: Attachment
    dify_type: str = ""
    variable: str | None = None
    multiple: bool = False
    refusal: str = ""

    @property
    def accepted(self) -> bool:
        return not self.refusal


def place_attachments(attachments: Sequence[Attachment], rules: UploadRules, app_type: str) -> list[Placement]:
    """Decide, before downloading anything, where each file goes or why it cannot be sent.

    Workflow apps fill their file input variables first (the app built for files declares one), then
    `files` (`sys.files`); chat and completion apps take `files` only (a chat app's inputs are fixed for the
    whole conversation after its first message).
    """
    placements: list[Placement] = []
    used: dict[str, int] = {}
    in_files = 0
    inputs = rules.file_inputs if app_type == "workflow" else ()
    for attachment in attachments:
        dify_type = attachment.dify_type
        placement: Placement | None = None
        for file_input in inputs:
            as_type = file_input.accepts(dify_type, attachment.extension)
            if as_type and used.get(file_input.variable, 0) < file_input.limit:
                used[file_input.variable] = used.get(file_input.variable, 0) + 1
                placement = Placement(attachment, as_type, file_input.variable, file_input.multiple)
                break
        if placement is None:
            as_type = rules.accepts(dify_type, attachment.extension)
            if as_type and in_files < rules.limit:
                in_files += 1
                placement = Placement(attachment, as_type)
            elif as_type or any(i.accepts(dify_type, attachment.extension) for i in inputs):
                room = (rules.limit if as_type else 0) + sum(
                    i.limit for i in inputs if i.accepts(dify_type, attachment.extension)
                )
                placement = Placement(attachment, refusal=too_many(attachment, room))
            else:
                placement = Placement(attachment, refusal=not_accepted(attachment, rules))
        placements.append(placement)
    return placements


def not_accepted(attachment: Attachment, rules: UploadRules) -> str:
    accepted = rules.accepted_labels()
    if not accepted or (not rules.local_file and not rules.file_inputs):
        return f"This app does not accept files or pictures, so {attachment.label} was not passed on."
    kind = _TYPE_LABELS.get(attachment.dify_type, "files")
    return f"This app does not accept {kind} ({attachment.label} was not passed on); it accepts {accepted}."


def too_many(attachment: Attachment, limit: int) -> str:
    kind = _TYPE_LABELS.get(attachment.dify_type, "files") if limit != 1 else _TYPE_SINGULAR.get(
        attachment.dify_type, "file"
    )
    return f"This app takes at most {limit} {kind} per message, so {attachment.label} was not passed on."


def too_large(attachment: Attachment, size: int, limit: int) -> str:
    return (
        f"{_capitalised(attachment.label)} is too large for this app "
        f"({size / MB:.1f} MB; the limit is {limit / MB:.0f} MB)."
    )


def _capitalised(label: str) -> str:
    return label[:1].upper() + label[1:]


def dify_file(dify_type: str, upload_file_id: str) -> dict[str, str]:
    """A `files` entry (or a file input's value) for an uploaded file."""
    return {"type": dify_type, "transfer_method": "local_file", "upload_file_id": upload_file_id}
