"""The Dify app types: the words the configuration accepts and the Dify adapter and the bridge speak.

One vocabulary, pure data, below both the configuration (which validates `dify_app_type` against it) and the
Dify adapter (which picks routes and request bodies by it), so neither defines it again.
"""

from __future__ import annotations

# chatbot, agent and chatflow apps share `/chat-messages` and its events: for the bridge they are alike
CHAT_APP_TYPES = ("chatbot", "agent", "chatflow")
# workflow and completion apps take the user's text as one of their inputs (`dify_input_variable`)
TEXT_INPUT_APP_TYPES = ("workflow", "completion")
APP_TYPES = (*CHAT_APP_TYPES, *TEXT_INPUT_APP_TYPES)
AUTO = "auto"  # ask the server on first use (`DifyClient.resolve_app_type`)
CONFIGURABLE_APP_TYPES = (*APP_TYPES, AUTO)  # what `dify_app_type` may say
CHAT_FAMILY = "chat"

# Dify's own name for each app mode (GET /info `mode` in 1.x, the `mode` of a blocking answer) -> our app type
APP_TYPE_BY_MODE = {
    "chat": "chatbot",
    "agent-chat": "agent",
    "agent": "agent",  # 1.x's Dify Agent runtime: served on /chat-messages like an agent-chat app
    "advanced-chat": "chatflow",
    "completion": "completion",
    "workflow": "workflow",
}
# 1.x modes no chat can use: a channel app is driven by its channels, a RAG pipeline only builds a knowledge base
UNSUPPORTED_MODES = ("channel", "rag-pipeline")


def family(app_type: str) -> str:
    """The route family: `chat` for the three chat-route types, else the type itself."""
    return CHAT_FAMILY if app_type in CHAT_APP_TYPES else app_type
