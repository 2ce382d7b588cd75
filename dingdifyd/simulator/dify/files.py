"""Files: uploads (`POST /files/upload`) and their signed previews, the files tools make (`/files/tools/...`),
the files workflow runs output, and how a run sees the files a request sent (docs/dify.md#files)."""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import secrets
import time
import uuid
from typing import Any

from aiohttp import BodyPartReader, web

from dingdifyd.simulator.dify.core import DifyCore
from dingdifyd.simulator.dify.errors import DifyHTTPError
from dingdifyd.simulator.dify.model import ID_NAMESPACE, TOOL_IMAGE, Run, UploadedFile


class DifyFiles(DifyCore):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self.uploads: dict[str, UploadedFile] = {}
        self.tool_files: dict[str, bytes] = {}
        self.output_files: dict[str, dict[str, Any]] = {}  # api key -> file outputs of its workflow runs
        self.file_delay = 0.0  # seconds each file download (/files/...) takes before its bytes
        self.files_served = 0
        self.max_files_in_flight = 0  # the most file downloads served at the same time
        self._files_in_flight = 0

    def _file_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/files/upload", self._upload),
            web.get("/files/tools/{name}", self._tool_file),
            web.get("/files/{file_id}/file-preview", self._file_preview),
        ]

    def add_tool_file(self, data: bytes, *, extension: str = "png") -> str:
        """Serve `data` as a file a tool made; returns its relative, signed URL, as Dify gives such URLs."""
        name = f"{uuid.uuid4()}.{extension}"
        self.tool_files[name] = data
        signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        return f"/files/tools/{name}?timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"

    def add_workflow_output_file(
        self, api_key: str, variable: str, data: bytes, *, filename: str, mime_type: str, file_type: str = "document"
    ) -> None:
        """Make the workflow app's runs output a file in `variable`, shaped like Dify 0.15's file objects."""
        extension = filename.rpartition(".")[2].lower() if "." in filename else "bin"
        url = self.add_tool_file(data, extension=extension)
        self.output_files.setdefault(api_key, {})[variable] = {
            "dify_model_identity": "__dify__file__", "id": None,
            "tenant_id": str(uuid.uuid5(ID_NAMESPACE, "tenant")), "type": file_type,
            "transfer_method": "tool_file", "remote_url": None, "related_id": str(uuid.uuid4()),
            "filename": filename, "extension": f".{extension}", "mime_type": mime_type, "size": len(data), "url": url,
        }  # fmt: skip

    async def _upload(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        fields: dict[str, str] = {}
        files: list[tuple[str, str, bytes]] = []
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):  # nested multipart: not something Dify takes
                    continue
                if part.filename is not None:
                    content_type = part.headers.get("Content-Type", "application/octet-stream")
                    files.append((part.filename, content_type, bytes(await part.read())))
                elif part.name:
                    fields[part.name] = await part.text()
        self._record(request, app, {**fields, "files": [name for name, _, _ in files]})
        app = self._authenticate(request)
        if not files and app.dialect.is_1x:
            raise DifyHTTPError(400, "no_file_uploaded", "Please upload your file.")
        if not files:
            message = "The browser (or proxy) sent a request that this server could not understand."
            raise DifyHTTPError(400, "bad_request_key_error", message)
        if len(files) > 1:
            raise DifyHTTPError(400, "too_many_files", "Only one file is allowed.")
        name, mime_type, data = files[0]
        if len(data) > 15 * 1024 * 1024:
            raise DifyHTTPError(413, "file_too_large", "File size exceeded. 15 MB is the limit.")
        user = fields.get("user") or "DEFAULT-USER"
        uploaded = UploadedFile(
            id=str(uuid.uuid4()),
            name=name,
            size=len(data),
            extension=name.rpartition(".")[2].lower() if "." in name else "",
            mime_type=mime_type,
            user=user,
            data=data,
        )
        self.uploads[uploaded.id] = uploaded
        body: dict[str, Any] = {"id": uploaded.id}
        if app.dialect.is_1x:
            body["reference"] = None
        body |= {
            "name": uploaded.name,
            "size": uploaded.size,
            "extension": uploaded.extension,
            "mime_type": uploaded.mime_type,
            "created_by": self._end_user_id(app, user),
            "created_at": int(time.time()),
        }
        if app.dialect.is_1x:  # 10: signed links and the new bookkeeping fields
            body |= {
                "preview_url": None, "source_url": self._signed_preview(uploaded.id), "original_url": None,
                "user_id": None, "tenant_id": str(uuid.uuid5(ID_NAMESPACE, "tenant")), "conversation_id": None,
                "file_key": None,
            }  # fmt: skip
        return app.dialect.restx_body(body, 201)

    def _signed_preview(self, file_id: str) -> str:
        signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        query = f"timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"
        return f"{self.public_url}/files/{file_id}/file-preview?{query}"

    async def _tool_file(self, request: web.Request) -> web.Response:
        data = self.tool_files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        if not request.query.get("sign"):
            raise DifyHTTPError(403, "forbidden", "Invalid request.")
        content_type = mimetypes.guess_type(request.match_info["name"])[0] or "application/octet-stream"
        self._files_in_flight += 1
        self.max_files_in_flight = max(self.max_files_in_flight, self._files_in_flight)
        try:
            if self.file_delay:
                await asyncio.sleep(self.file_delay)
            self.files_served += 1
            return web.Response(body=data, content_type=content_type)
        finally:
            self._files_in_flight -= 1

    async def _file_preview(self, request: web.Request) -> web.Response:
        uploaded = self.uploads.get(request.match_info["file_id"])
        if uploaded is None:
            raise web.HTTPNotFound()
        return web.Response(body=uploaded.data, content_type=uploaded.mime_type)

    def _file_variable(self, file: dict[str, Any]) -> dict[str, Any]:
        """How a workflow sees a file the request sent (`sys.files`)."""
        uploaded = self.uploads.get(file.get("upload_file_id") or "")
        if uploaded is not None:
            signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
            query = f"timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"
            name, size, mime_type = uploaded.name, uploaded.size, uploaded.mime_type
            url = f"{self.public_url}/files/{uploaded.id}/file-preview?{query}"
        else:
            url = str(file.get("url") or "")
            name, size, mime_type = url.rpartition("/")[2].partition("?")[0], -1, None
        return {
            "dify_model_identity": "__dify__file__",
            "id": None,
            "tenant_id": str(uuid.uuid5(ID_NAMESPACE, "tenant")),
            "type": file.get("type", "image"),
            "transfer_method": file.get("transfer_method"),
            "remote_url": "" if uploaded is not None else url,
            "related_id": uploaded.id if uploaded is not None else None,
            "filename": name,
            "extension": "." + name.rpartition(".")[2] if "." in name else "",
            "mime_type": mime_type,
            "size": size,
            "url": url,
        }

    def _answer_upload(self, run: Run) -> UploadedFile:
        """The picture an answer shows (`answer_file`): an uploaded file, served as its signed preview (26b)."""
        key = f"answer-file:{run.task_id}"
        uploaded = self.uploads.get(key)
        if uploaded is None:
            uploaded = UploadedFile(id=str(uuid.uuid4()), name="chart.png", size=len(TOOL_IMAGE), extension="png",
                                    mime_type="image/png", user=run.user, data=TOOL_IMAGE)  # fmt: skip
            self.uploads[key] = self.uploads[uploaded.id] = uploaded
        return uploaded

    def _answer_file_markdown(self, run: Run) -> str:
        uploaded = self._answer_upload(run)
        return f" ![{uploaded.name}]({self._signed_preview(uploaded.id)})"

    def _answer_file_object(self, run: Run) -> dict[str, Any]:
        """1.x's File object of the same picture, signed anew (so its URL differs from the markdown's)."""
        uploaded = self._answer_upload(run)
        reference = base64.b64encode(json.dumps({"record_id": uploaded.id}).encode()).decode()
        return {
            "dify_model_identity": "__dify__file__", "id": None, "type": "image", "transfer_method": "local_file",
            "remote_url": "", "reference": f"dify-file-ref:{reference}", "filename": uploaded.name,
            "extension": ".png", "mime_type": uploaded.mime_type, "size": uploaded.size, "related_id": uploaded.id,
            "url": self._signed_preview(uploaded.id),
        }  # fmt: skip
