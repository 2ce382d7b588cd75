"""Which files a DingTalk message carries, what a Dify app accepts (real 0.15.3 /parameters), where each file
goes; and which of Dify's URLs and outputs are files to bring over to DingTalk."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dingdifyd.bridge import attachments as att
from dingdifyd.bridge.media import dify_file_url, file_name_of, files_in_outputs
from dingdifyd.models import IncomingMessage
from tests.support.transcripts import DIFY_0_15_FIXTURES

FIXTURES = DIFY_0_15_FIXTURES
CHAT_PARAMETERS = json.loads((FIXTURES / "49-parameters.json").read_text())  # images and documents, 3 files
CHATFLOW_PARAMETERS = json.loads((FIXTURES / "98-chatflow-parameters.json").read_text())  # images only
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452")


def message(msg_type: str, content: dict[str, Any], text: str = "") -> IncomingMessage:
    return IncomingMessage(
        robot_code="dingbot", msg_id="m1", msg_type=msg_type, text=text, conversation_id="cid1",
        conversation_type="1", sender_id="$:x", sender_staff_id="staff1", content=content,
    )  # fmt: skip


RICH = [
    {"text": "Compare this one:"},
    {"pictureDownloadCode": "p1", "downloadCode": "dc1", "type": "picture"},
    {"text": "with that one:"},
    {"pictureDownloadCode": "p2", "downloadCode": "dc2", "type": "picture"},
    {"text": "Which is better?"},
]


def test_the_files_of_each_kind_of_message():
    picture = message("picture", {"pictureDownloadCode": "pX", "downloadCode": "dX"})
    assert att.attachments_of(picture) == [att.Attachment("picture", "dX")]
    rich = message("richText", {"richText": RICH})
    assert [a.download_code for a in att.attachments_of(rich)] == ["dc1", "dc2"]  # message order
    video = message("video", {"duration": "5", "videoType": "mp4", "downloadCode": "dV"})
    assert att.attachments_of(video) == [att.Attachment("video", "dV", "video.mp4", "mp4")]
    file = message("file", {"spaceId": "1", "fileName": "Q3 report.PDF", "downloadCode": "dF", "fileId": "2"})
    (document,) = att.attachments_of(file)
    assert (document.name, document.extension, document.dify_type, document.label) == (
        "Q3 report.PDF", "pdf", "document", "“Q3 report.PDF”"
    )
    voice = message("audio", {"downloadCode": "dA", "recognition": "hello"}, text="hello")
    assert att.attachments_of(voice) == []  # voice is text
    assert att.attachments_of(message("text", {})) == []


def test_rich_text_keeps_the_places_of_several_pictures():
    rich = message("richText", {"richText": RICH}, text="Compare this one:\nwith that one:\nWhich is better?")
    assert att.rich_text_query(rich, [True, True]) == (
        "Compare this one:\n[image 1]\nwith that one:\n[image 2]\nWhich is better?"
    )
    # one picture sent (the other refused): its place says nothing, the text is the person's
    assert att.rich_text_query(rich, [False, True]) == rich.text


def test_upload_rules_of_a_real_chat_app():
    rules = att.UploadRules.from_parameters(CHAT_PARAMETERS)
    assert rules.enabled and rules.local_file
    assert rules.types == {"image", "document"}
    assert rules.limit == 3
    assert rules.size_limit("image") == 10 * att.MB
    assert rules.size_limit("document") == 15 * att.MB
    assert rules.accepts("image", "png") == "image"
    assert rules.accepts("document", "pdf") == "document"
    assert rules.accepts("video", "mp4") is None
    assert rules.accepted_labels() == "pictures and documents"
    assert att.UploadRules.from_parameters(CHATFLOW_PARAMETERS).types == {"image"}


def test_upload_rules_of_old_and_disabled_apps():
    old = att.UploadRules.from_parameters(
        {"file_upload": {"image": {"enabled": True, "number_limits": 2, "transfer_methods": ["local_file"]}}}
    )
    assert old.enabled and old.types == {"image"} and old.limit == 2
    remote_only = att.UploadRules.from_parameters(
        {"file_upload": {"image": {"enabled": True, "transfer_methods": ["remote_url"]}}}
    )
    assert remote_only.accepts("image", "png") is None
    disabled = att.UploadRules.from_parameters({**CHAT_PARAMETERS, "file_upload": {**CHAT_PARAMETERS["file_upload"],
                                                                                   "enabled": False}})
    assert disabled.accepts("image", "png") is None
    assert att.UploadRules.from_parameters({}).accepts("image", "png") is None


def test_custom_files_pass_by_their_listed_extensions():
    rules = att.UploadRules.from_parameters(
        {"file_upload": {"enabled": True, "allowed_file_types": ["custom"], "allowed_file_extensions": [".ZIP"],
                         "allowed_file_upload_methods": ["local_file"], "number_limits": 1}}
    )
    assert rules.accepts(att.dify_type_of("zip"), "zip") == "custom"
    assert rules.accepts(att.dify_type_of("rar"), "rar") is None


def test_a_chat_app_takes_files_up_to_its_limit_and_says_why_not_the_rest():
    rules = att.UploadRules.from_parameters(CHAT_PARAMETERS)
    files = [att.Attachment("picture", f"d{i}") for i in range(4)] + [att.Attachment("video", "dv", "v.mp4", "mp4")]
    placed = att.place_attachments(files, rules, "chatbot")
    assert [p.accepted for p in placed] == [True, True, True, False, False]
    assert all(p.dify_type == "image" and p.variable is None for p in placed[:3])
    assert placed[3].refusal == "This app takes at most 3 pictures per message, so the picture was not passed on."
    assert placed[4].refusal == (
        "This app does not accept videos (the video was not passed on); it accepts pictures and documents."
    )


def test_an_app_without_file_upload_refuses_clearly():
    placed = att.place_attachments([att.Attachment("picture", "d")], att.UploadRules(), "chatbot")
    assert placed[0].refusal == "This app does not accept files or pictures, so the picture was not passed on."


WORKFLOW_FORM = {
    "user_input_form": [
        {"text-input": {"label": "query", "variable": "query", "required": True, "type": "text-input"}},
        {"file": {"label": "doc", "variable": "doc", "required": False, "type": "file",
                  "allowed_file_types": ["document"], "allowed_file_extensions": [],
                  "allowed_file_upload_methods": ["local_file", "remote_url"]}},
        {"file-list": {"label": "pics", "variable": "pics", "required": False, "type": "file-list",
                       "max_length": 2, "allowed_file_types": ["image"],
                       "allowed_file_upload_methods": ["local_file"]}},
    ],
    "file_upload": {"enabled": False},
}


def test_a_workflow_fills_its_file_inputs():
    rules = att.UploadRules.from_parameters(WORKFLOW_FORM)
    files = [
        att.Attachment("file", "d1", "spec.docx", "docx"),
        att.Attachment("picture", "p1"),
        att.Attachment("picture", "p2"),
        att.Attachment("picture", "p3"),
    ]
    placed = att.place_attachments(files, rules, "workflow")
    assert (placed[0].variable, placed[0].multiple, placed[0].dify_type) == ("doc", False, "document")
    assert [(p.variable, p.multiple) for p in placed[1:3]] == [("pics", True), ("pics", True)]
    assert "at most 2 pictures" in placed[3].refusal
    # the same form means nothing to a chat app: its inputs are fixed for the conversation
    assert not any(p.accepted for p in att.place_attachments(files, rules, "chatflow"))


@pytest.mark.parametrize(("data", "extension"), [
    (PNG, "png"), (b"\xff\xd8\xff\xe0rest", "jpg"), (b"GIF89a...", "gif"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
    (b"unknown bytes", "jpg"),
])
def test_picture_formats_are_told_by_their_bytes(data: bytes, extension: str):
    assert att.sniff_image_extension(data) == extension


def test_a_file_entry_is_shaped_like_dify_wants_it():
    # transcript 31: {"type": "image", "transfer_method": "local_file", "upload_file_id": ...}
    assert att.dify_file("image", "281356a8") == {"type": "image", "transfer_method": "local_file",
                                                  "upload_file_id": "281356a8"}


# --- Dify's files, on the way out ---------------------------------------------------------------------------

BASE = "https://dify.example.com"


@pytest.mark.parametrize(("url", "fetched"), [
    ("/files/tools/abc.png?timestamp=1&nonce=2&sign=3", f"{BASE}/files/tools/abc.png?timestamp=1&nonce=2&sign=3"),
    (f"{BASE}/files/tools/abc.png?sign=3", f"{BASE}/files/tools/abc.png?sign=3"),
    ("HTTPS://DIFY.example.com:443/files/tools/abc.png", "HTTPS://DIFY.example.com:443/files/tools/abc.png"),
    # a Dify-looking path on any other origin is not Dify's: the daemon never fetches it (SSRF), DingTalk may
    ("https://files.example.net/files/tools/abc.png?sign=3", None),
    ("http://169.254.169.254/files/tools/a.png", None),
    ("http://dify.example.com/files/tools/abc.png", None),  # another scheme is another origin
    ("https://dify.example.com:8443/files/tools/abc.png", None),  # so is another port
    ("https://dify.example.com.evil.net/files/tools/abc.png", None),
    ("https://dify.example.com@169.254.169.254/files/tools/abc.png", None),
    ("https://upload.wikimedia.org/some.png", None),
    ("@lAabc", None),
    ("data:image/png;base64,iVBOR", None),
])
def test_which_urls_are_dify_files(url: str, fetched: str | None):
    assert dify_file_url(url, BASE) == fetched


def test_files_on_a_configured_files_host_are_fetched_too():
    url = "https://files.example.net/files/tools/abc.png?sign=3"
    assert dify_file_url(url, BASE, ["https://files.example.net"]) == url
    other_port = "https://files.example.net:444/files/tools/abc.png"
    assert dify_file_url(other_port, BASE, ["https://files.example.net"]) is None


def test_file_names_come_from_the_url_or_the_content_type():
    assert file_name_of(f"{BASE}/files/tools/abc.png?sign=1") == "abc.png"
    assert file_name_of(f"{BASE}/files/281356a8-e49b-47f3-afd1-0d38cd0ba0d2/file-preview?x", "application/pdf") \
        == "file.pdf"


def test_workflow_outputs_name_their_files():
    pdf = {"dify_model_identity": "__dify__file__", "type": "document", "transfer_method": "tool_file",
           "filename": "report.pdf", "url": "/files/tools/r.pdf?sign=1"}
    outputs = {"text": "done", "report": pdf, "charts": [pdf, {"not": "a file"}], "count": 3}
    assert files_in_outputs(outputs) == [pdf, pdf]
