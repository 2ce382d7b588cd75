"""AI cards: create, deliver, create-and-deliver, update the card data, and streaming updates, with DingTalk's
validations and error codes (docs/dingtalk.md#ai-cards). Each call goes through the OpenAPI gate (oauth.py),
which applies the per-app-per-API QPS limit (20/s by default). `FakeCard` is what a test reads."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dingtalk.core import (
    API_CARD_CREATE,
    API_CARD_DELIVER,
    API_CARD_STREAMING,
    API_CARD_UPDATE,
    API_CREATE_AND_DELIVER,
    FakeApp,
    api_error,
    is_str_map,
)
from dingdifyd.simulator.dingtalk.oauth import OAuthRoutes

log = logging.getLogger(__name__)

_OPEN_SPACE = re.compile(r"^dtv1\.card//(IM_GROUP|IM_ROBOT|IM_SINGLE|ONE_BOX)\.(.+)$", re.IGNORECASE)


@dataclass
class StreamUpdate:
    """One accepted `PUT /v1.0/card/streaming`."""

    key: str
    content: str
    is_full: bool
    is_finalize: bool
    is_error: bool
    guid: str


@dataclass
class FakeCard:
    out_track_id: str
    client_id: str
    template_id: str
    card_param_map: dict[str, str]
    create_body: dict[str, Any]
    delivered: bool = False
    open_space_ids: list[str] = field(default_factory=list)
    timeline: list[StreamUpdate] = field(default_factory=list)
    param_updates: list[dict[str, str]] = field(default_factory=list)
    finalized: bool = False  # a streaming call with isFinalize was accepted
    error: bool = False  # a streaming call with isError was accepted
    shown: dict[str, str] = field(default_factory=dict)  # what each variable shows now (data or stream)
    first_text_at: float | None = None  # when the card first showed answer text (time.monotonic())

    @property
    def flow_status(self) -> str | None:
        """The built-in AI template's state: 1 processing, 2 typing, 3 done, 5 failed."""
        return self.card_param_map.get("flowStatus")

    @property
    def contents(self) -> list[str]:
        """Every streamed content, in order."""
        return [update.content for update in self.timeline]

    @property
    def content_key(self) -> str:
        if self.timeline:
            return self.timeline[-1].key
        return "msgContent" if "msgContent" in self.card_param_map else "content"

    @property
    def text(self) -> str:
        """What the card's main text shows now."""
        return self.shown.get(self.content_key, "")

    @property
    def done(self) -> bool:
        """Finished or failed: by flowStatus on the built-in template (whose last call sets it), else by a
        final streaming call."""
        if self.flow_status is not None:
            return self.flow_status in ("3", "5")
        return self.finalized

    @property
    def failed(self) -> bool:
        if self.flow_status is not None:
            return self.flow_status == "5"
        return self.error

    @property
    def final_content(self) -> str | None:
        return self.text if self.done else None


class CardRoutes(OAuthRoutes):
    def __init__(self, *, max_stream_content: int = 100_000, templates: set[str] | None = None, **options: Any):
        super().__init__(**options)
        self.max_stream_content = max_stream_content
        self.templates = templates  # None: every template id exists
        self.cards: dict[str, FakeCard] = {}
        self._card_listeners: list[Callable[[FakeCard], None]] = []

    def _card_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1.0/card/instances/createAndDeliver",
                     self._openapi(API_CREATE_AND_DELIVER, self._card_create_and_deliver)),
            web.post("/v1.0/card/instances", self._openapi(API_CARD_CREATE, self._card_create)),
            web.post("/v1.0/card/instances/deliver", self._openapi(API_CARD_DELIVER, self._card_deliver)),
            web.put("/v1.0/card/instances", self._openapi(API_CARD_UPDATE, self._card_update)),
            web.put("/v1.0/card/streaming", self._openapi(API_CARD_STREAMING, self._card_streaming)),
        ]

    def add_card_listener(self, listener: Callable[[FakeCard], None]) -> None:
        """Call `listener(card)` after every change of a card (the demo renders with it)."""
        self._card_listeners.append(listener)

    async def wait_card_final(
        self, card: str | Callable[[FakeCard], bool], timeout: float = 5.0
    ) -> FakeCard:
        """Wait for a card to be done (finished or failed), by outTrackId or by a predicate on the card."""
        def find() -> FakeCard | None:
            if isinstance(card, str):
                found = self.cards.get(card)
                return found if found is not None and found.done else None
            return next((c for c in list(self.cards.values()) if c.done and card(c)), None)

        return await self.wait_for(find, timeout, f"card {card if isinstance(card, str) else ''} to finish")

    def _card_changed(self, card: FakeCard) -> None:
        if card.first_text_at is None and card.text:
            card.first_text_at = time.monotonic()
        self._touch()
        for listener in self._card_listeners:
            try:
                listener(card)
            except Exception:
                log.exception("card listener failed")

    def _card_problem(self, app: FakeApp, body: dict[str, Any]) -> web.Response | None:
        out_track_id = body.get("outTrackId")
        if not isinstance(out_track_id, str) or not out_track_id:
            return api_error(400, "param.outTrackIdEmpty", "outTrackId is empty")
        template_id = body.get("cardTemplateId")
        if not isinstance(template_id, str) or not template_id or (
            self.templates is not None and template_id not in self.templates
        ):
            return api_error(400, "param.templateNotExist", "card template does not exist")
        card_data = body.get("cardData")
        if not isinstance(card_data, dict) or not is_str_map(card_data.get("cardParamMap", {})):
            return api_error(400, "param.invalid", "cardData.cardParamMap must map strings to strings")
        if body.get("callbackType", "STREAM") not in ("STREAM", "HTTP"):
            return api_error(400, "param.invalid", "callbackType must be STREAM or HTTP")
        if out_track_id in self.cards:
            return api_error(400, "param.cardAlreadyExist", "card already exists")
        return None

    def _delivery_problem(
        self, app: FakeApp, body: dict[str, Any]
    ) -> tuple[web.Response | None, list[tuple[str, str]]]:
        open_space_id = body.get("openSpaceId")
        spaces: list[tuple[str, str]] = []
        for part in open_space_id.split(";") if isinstance(open_space_id, str) and open_space_id else [""]:
            match = _OPEN_SPACE.match(part)
            if match is None:
                return api_error(400, "param.openSpaceIdInvalid", "openSpaceId is invalid"), []
            spaces.append((match.group(1).upper(), match.group(2)))
        for space_type, _ in spaces:
            if space_type == "IM_GROUP":
                model = body.get("imGroupOpenDeliverModel")
                if not isinstance(model, dict) or model.get("robotCode") != app.robot_code:
                    problem = api_error(400, "param.invalid", "imGroupOpenDeliverModel.robotCode is invalid")
                    return problem, []
            if space_type == "IM_ROBOT":
                model = body.get("imRobotOpenDeliverModel")
                if not isinstance(model, dict) or model.get("spaceType") != "IM_ROBOT":
                    return api_error(400, "param.invalid", "imRobotOpenDeliverModel is invalid"), []
        return None, spaces

    def _new_card(self, app: FakeApp, body: dict[str, Any]) -> FakeCard:
        param_map = dict(body["cardData"].get("cardParamMap", {}))
        card = FakeCard(
            out_track_id=body["outTrackId"], client_id=app.client_id, template_id=body["cardTemplateId"],
            card_param_map=param_map, create_body=body, shown=dict(param_map),
        )
        self.cards[card.out_track_id] = card
        return card

    @staticmethod
    def _deliver_results(spaces: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"spaceType": space_type, "spaceId": space_id, "success": True, "carrierId": uuid.uuid4().hex,
                 "errorMsg": ""} for space_type, space_id in spaces]

    def _owned_card(self, app: FakeApp, out_track_id: Any) -> FakeCard | None:
        card = self.cards.get(out_track_id) if isinstance(out_track_id, str) else None
        return card if card is not None and card.client_id == app.client_id else None

    async def _card_create_and_deliver(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._card_problem(app, body)
        if problem is not None:
            return problem
        problem, spaces = self._delivery_problem(app, body)
        if problem is not None:
            return problem
        card = self._new_card(app, body)
        card.delivered = True
        card.open_space_ids = [f"{t}.{i}" for t, i in spaces]
        self._card_changed(card)
        return web.json_response({"success": True, "result": {
            "outTrackId": card.out_track_id, "deliverResults": self._deliver_results(spaces),
        }})

    async def _card_create(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._card_problem(app, body)
        if problem is not None:
            return problem
        card = self._new_card(app, body)
        self._card_changed(card)
        return web.json_response({"success": True, "result": card.out_track_id})

    async def _card_deliver(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        card = self._owned_card(app, body.get("outTrackId"))
        if card is None:
            return api_error(400, "param.cardNotExist", "card does not exist")
        problem, spaces = self._delivery_problem(app, body)
        if problem is not None:
            return problem
        card.delivered = True
        card.open_space_ids.extend(f"{t}.{i}" for t, i in spaces)
        self._card_changed(card)
        return web.json_response({"success": True, "result": self._deliver_results(spaces)})

    async def _card_update(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        card = self._owned_card(app, body.get("outTrackId"))
        if card is None:
            return api_error(400, "param.cardNotExist", "card does not exist")
        card_data = body.get("cardData", {})
        params = card_data.get("cardParamMap", {}) if isinstance(card_data, dict) else None
        if not is_str_map(params):
            return api_error(400, "param.invalid", "cardData.cardParamMap must map strings to strings")
        options = body.get("cardUpdateOptions")
        by_key = isinstance(options, dict) and options.get("updateCardDataByKey") is True
        if by_key:
            card.card_param_map.update(params)
        else:
            card.card_param_map = dict(params)
        card.shown.update(params)
        card.param_updates.append(dict(params))
        self._card_changed(card)
        return web.json_response({"success": True, "result": True})

    async def _card_streaming(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        required = (("outTrackId", "param.stream.outTrackId"), ("guid", "param.stream.guidEmpty"),
                    ("key", "param.stream.keyEmpty"), ("content", "param.stream.contentEmpty"))
        for field_name, code in required:
            value = body.get(field_name)
            if not isinstance(value, str) or not value:
                return api_error(400, code, f"{field_name} is empty")
        card = self._owned_card(app, body["outTrackId"])
        if card is None:
            return api_error(400, "param.stream.outTrackId", "card is not exist")
        is_full = body.get("isFull")
        if is_full is None:
            return api_error(400, "param.stream.isFull", "streaming update the parameter isFull is null")
        if is_full is not True:
            # Markdown-bound variables only take full updates (docs/dingtalk.md#streaming-the-text).
            return api_error(400, "param.stream.isFull", "isFull must be true for a markdown variable")
        content = body["content"]
        if len(content.encode()) > self.max_stream_content:
            return api_error(400, "param.stream.content", "content is too large")
        if card.finalized:
            return api_error(400, "param.stream.finished", "card streaming is already finished")
        update = StreamUpdate(body["key"], content, True, body.get("isFinalize") is True,
                              body.get("isError") is True, body["guid"])
        card.timeline.append(update)
        card.shown[update.key] = content
        card.finalized = update.is_finalize or update.is_error
        card.error = update.is_error
        self._card_changed(card)
        return web.json_response({"success": True, "result": True})
