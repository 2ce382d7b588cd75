"""Files both ways: the files behind a message's downloadCode (`POST /v1.0/robot/messageFiles/download` gives a
URL this fake serves) and the legacy media upload (`POST /media/upload?access_token=`) that gives a media_id
(docs/dingtalk.md#files-and-media)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dingtalk.core import API_FILE_DOWNLOAD, API_MEDIA_UPLOAD, FakeApp, api_error, now_ms
from dingdifyd.simulator.dingtalk.oauth import OAuthRoutes

SAMPLE_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360f8cf"
    "c0f01f0005000201e2b3d43a0000000049454e44ae426082"
)


@dataclass
class UploadedMedia:
    media_id: str
    media_type: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class _StoredFile:
    data: bytes
    content_type: str


class MediaRoutes(OAuthRoutes):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self.uploaded_media: list[UploadedMedia] = []
        self._files: dict[str, _StoredFile] = {}
        self._download_codes: dict[str, str] = {}

    def _media_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1.0/robot/messageFiles/download", self._openapi(API_FILE_DOWNLOAD, self._file_download)),
            web.post("/media/upload", self._media_upload),
            web.get("/files/{file_id}", self._serve_file),
        ]

    def add_file(self, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Store bytes behind a new downloadCode (for picture/file messages); returns the code."""
        file_id = uuid.uuid4().hex
        self._files[file_id] = _StoredFile(data, content_type)
        code = f"dc{uuid.uuid4().hex}"
        self._download_codes[code] = file_id
        return code

    async def _file_download(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        file_id = self._download_codes.get(str(body.get("downloadCode")))
        if file_id is None:
            return api_error(400, "invalidParameter.downloadCode", "downloadCode is invalid")
        if body.get("robotCode") != app.robot_code:
            return api_error(400, "invalidParameter.robotCode.auth", "robotCode is invalid")
        return web.json_response({"downloadUrl": f"{self.base_url}/files/{file_id}"})

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        stored = self._files.get(request.match_info["file_id"])
        if stored is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _media_upload(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_MEDIA_UPLOAD] += 1
        fault = self._take_fault(API_MEDIA_UPLOAD)
        if fault is not None:
            return await self._fault_response(fault)
        if self._app_for_token(request.query.get("access_token")) is None:
            return web.json_response({"errcode": 40014, "errmsg": "不合法的access_token"})
        form = await request.post()
        media = form.get("media")
        if not isinstance(media, web.FileField):
            return web.json_response({"errcode": 41001, "errmsg": "missing media"})
        media_type = str(form.get("type") or request.query.get("type") or "")
        if media_type not in ("image", "voice", "video", "file"):
            return web.json_response({"errcode": 40004, "errmsg": "invalid media type"})
        uploaded = UploadedMedia(f"@lA{uuid.uuid4().hex}", media_type, media.filename,
                                 media.content_type, media.file.read())
        self.uploaded_media.append(uploaded)
        self._touch()
        return web.json_response({"errcode": 0, "errmsg": "ok", "type": media_type,
                                  "media_id": uploaded.media_id, "created_at": now_ms()})
