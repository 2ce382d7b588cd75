"""The bridge's MessageFiles on DingTalk: the bytes of what a person sent, the media store, and image and file
messages sent to the chat after the answer's card (docs/dingtalk.md#files-and-media,
docs/dingtalk.md#robot-send-api)."""

from __future__ import annotations

from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.models import IncomingMessage


def _file_type(filename: str) -> str:
    base = filename.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[1].lower() if "." in base.strip(".") else "file"


class DingTalkFiles:
    def __init__(self, api: DingTalkApi):
        self.api = api

    async def download(self, message: IncomingMessage, download_code: str) -> bytes:
        return await self.api.download_message_file(download_code=download_code, robot_code=message.robot_code)

    async def upload(self, data: bytes, *, filename: str, content_type: str, kind: str) -> str:
        """`kind`: image (shown in markdown and image messages) or file (file messages)."""
        return await self.api.upload_media(data, filename=filename, content_type=content_type, media_type=kind)

    async def send_image(self, message: IncomingMessage, photo_url: str) -> None:
        """`photo_url`: a media id (`@lA...`) or an https URL."""
        await self._send(message, "sampleImageMsg", {"photoURL": photo_url})

    async def send_file(self, message: IncomingMessage, media_id: str, filename: str) -> None:
        await self._send(
            message, "sampleFile", {"mediaId": media_id, "fileName": filename, "fileType": _file_type(filename)}
        )

    async def _send(self, message: IncomingMessage, msg_key: str, msg_param: dict[str, str]) -> None:
        await self.api.send_robot_message(
            robot_code=message.robot_code, conversation_type=message.conversation_type,
            conversation_id=message.conversation_id, staff_id=message.sender_staff_id,
            msg_key=msg_key, msg_param=msg_param,
        )  # fmt: skip
