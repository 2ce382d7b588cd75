"""What an app says about itself: `GET /` (the server), `/info`, `/parameters`, `/meta`, in each version's
shape (docs/dify.md#app-info)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.chat import ChatApps
from dingdifyd.simulator.dify.dialect import Dialect
from dingdifyd.simulator.dify.model import WORKFLOW_MODES


class AppInfoRoutes(ChatApps):
    """`/parameters` says whether suggested questions are on: chat.py switches them."""

    def _app_info_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/", self._root),
            web.get("/v1", self._root),
            web.get("/v1/info", self._info),
            web.get("/v1/parameters", self._parameters),
            web.get("/v1/meta", self._meta),
        ]

    async def _root(self, request: web.Request) -> web.Response:
        self._record(request, None, None)
        body = {"welcome": "Dify OpenAPI", "api_version": "v1", "server_version": self.version}
        return Dialect(self.version).restx_body(body)

    async def _info(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        self._record(request, app, None)
        app = self._authenticate(request)
        info: dict[str, Any] = {"name": app.name, "description": app.description, "tags": []}
        if self.info_with_mode or app.dialect.is_1x:
            info["mode"] = app.mode
            info["author_name"] = "fake" if not app.dialect.is_1x else "admin"
        return app.dialect.restx_body(info)

    async def _meta(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        return app.dialect.restx_body({"tool_icons": {}})

    async def _parameters(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        methods = ["local_file", "remote_url"]
        parameters: dict[str, Any] = (
            {
                "opening_statement": app.opening_statement,
                "suggested_questions": [],
                "suggested_questions_after_answer": {"enabled": app.api_key in self._suggested},
                "speech_to_text": {"enabled": False},
                "text_to_speech": {"enabled": False, "voice": "", "language": ""},
                "retriever_resource": {"enabled": False},
                "annotation_reply": {"enabled": False},
                "more_like_this": {"enabled": False},
                "user_input_form": app.user_input_form,
                "sensitive_word_avoidance": {"enabled": False, "type": "", "configs": []},
                "file_upload": {
                    "enabled": app.file_upload,
                    "allowed_file_types": ["image", "document"],
                    "allowed_file_extensions": [],
                    "allowed_file_upload_methods": methods,
                    "number_limits": 3,
                    "image": {
                        "enabled": app.file_upload,
                        "number_limits": 3,
                        "detail": "high",
                        "transfer_methods": methods,
                    },
                },
                "system_parameters": {
                    "image_file_size_limit": 10,
                    "video_file_size_limit": 100,
                    "audio_file_size_limit": 50,
                    "file_size_limit": 15,
                    "workflow_file_upload_limit": 10,
                },
            }
        )
        if app.dialect.is_1x:  # 03, 04: no `image` section, a shorter moderation section
            if app.mode in WORKFLOW_MODES:
                parameters["file_upload"].pop("image")
            elif not app.file_upload:  # 110b, 120b, 130b: a classic app without uploads has the image section only
                parameters["file_upload"] = {"image": {"detail": "high", "enabled": False, "number_limits": 3,
                                                       "transfer_methods": ["remote_url", "local_file"]}}  # fmt: skip
            parameters["sensitive_word_avoidance"] = {"enabled": False}
            if app.mode == "workflow" and not app.opening_statement:
                parameters["opening_statement"] = None
        return app.dialect.restx_body(parameters)
