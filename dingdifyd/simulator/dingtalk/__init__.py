"""A loopback fake of DingTalk for the tests, the demo and the benchmarks (docs/dingtalk.md).

It serves the Stream gateway (stream.py), the access token and the OpenAPI gate (oauth.py), AI cards (cards.py),
message files and media upload (media.py), robot messages and session webhooks (robot.py) and the QR-code app
registration (registration.py); server.py puts them together as `FakeDingTalk`. Import from here.
"""

from dingdifyd.simulator.dingtalk.cards import FakeCard, StreamUpdate
from dingdifyd.simulator.dingtalk.core import (
    API_BATCH_SEND,
    API_CARD_CREATE,
    API_CARD_DELIVER,
    API_CARD_STREAMING,
    API_CARD_UPDATE,
    API_CREATE_AND_DELIVER,
    API_FILE_DOWNLOAD,
    API_GATEWAY_OPEN,
    API_GROUP_SEND,
    API_MEDIA_UPLOAD,
    API_TOKEN,
    API_WEBHOOK,
    KNOWN_APIS,
    FakeApp,
)
from dingdifyd.simulator.dingtalk.media import SAMPLE_PNG, UploadedMedia
from dingdifyd.simulator.dingtalk.oauth import API_SCOPES, PERMISSION_DENIED_CODE, QPS_LIMIT_CODE
from dingdifyd.simulator.dingtalk.registration import FakeRegistration, RegistrationSession
from dingdifyd.simulator.dingtalk.robot import SentMessage, WebhookReply
from dingdifyd.simulator.dingtalk.server import FakeDingTalk
from dingdifyd.simulator.dingtalk.stream import CHATBOT_TOPIC, Ack

__all__ = [
    "API_BATCH_SEND", "API_CARD_CREATE", "API_CARD_DELIVER", "API_CARD_STREAMING", "API_CARD_UPDATE",
    "API_CREATE_AND_DELIVER", "API_FILE_DOWNLOAD", "API_GATEWAY_OPEN", "API_GROUP_SEND", "API_MEDIA_UPLOAD",
    "API_SCOPES", "API_TOKEN", "API_WEBHOOK", "CHATBOT_TOPIC", "KNOWN_APIS", "PERMISSION_DENIED_CODE",
    "QPS_LIMIT_CODE", "SAMPLE_PNG", "Ack", "FakeApp", "FakeCard", "FakeDingTalk", "FakeRegistration",
    "RegistrationSession", "SentMessage", "StreamUpdate", "UploadedMedia", "WebhookReply",
]  # fmt: skip
