from __future__ import annotations

from dataclasses import replace

from dingdifyd.bridge import session
from dingdifyd.models import GROUP_CHAT, SINGLE_CHAT, IncomingMessage

DM = IncomingMessage(
    robot_code="dingbot", msg_id="msgA", msg_type="text", text="hi", conversation_id="cidDM",
    conversation_type=SINGLE_CHAT, sender_id="$:LWCP_v1:$enc", sender_staff_id="staff42", sender_nick="Zhang San",
    sender_corp_id="dingcorp",
)  # fmt: skip
GROUP = replace(DM, conversation_type=GROUP_CHAT, conversation_id="cidGROUP", conversation_title="Team")


def test_dify_user_is_stable_and_never_the_nickname():
    assert session.dify_user(DM, "user") == "dingtalk:dingcorp:staff42"
    renamed = replace(DM, sender_nick="Someone Else")
    assert session.dify_user(renamed, "user") == session.dify_user(DM, "user")
    assert "Zhang" not in session.dify_user(DM, "user")


def test_external_users_fall_back_to_the_encrypted_sender_id():
    external = replace(DM, sender_staff_id="")
    assert session.dify_user(external, "user") == "dingtalk:dingcorp:$:LWCP_v1:$enc"


def test_session_keys_separate_dm_group_and_users():
    other_user = replace(GROUP, sender_staff_id="staff7")
    keys = {
        session.session_key("bot", DM, "user"),
        session.session_key("bot", GROUP, "user"),
        session.session_key("bot", other_user, "user"),
        session.session_key("other-bot", DM, "user"),
    }
    assert len(keys) == 4


def test_chat_scope_shares_one_context_and_one_dify_user_per_group():
    other_user = replace(GROUP, sender_staff_id="staff7")
    assert session.session_key("bot", GROUP, "chat") == session.session_key("bot", other_user, "chat")
    # Dify scopes conversations to (app, user): a shared context needs a shared user
    assert session.dify_user(GROUP, "chat") == session.dify_user(other_user, "chat")
    # 1:1 chats are per user whatever the scope
    assert session.session_key("bot", DM, "chat") == session.session_key("bot", DM, "user")


def test_out_track_id_is_derived_from_the_message_identity():
    assert session.out_track_id(DM) == session.out_track_id(replace(DM, text="redelivered"))
    assert session.out_track_id(DM) != session.out_track_id(replace(DM, msg_id="msgB"))
    assert session.out_track_id(DM) != session.out_track_id(replace(DM, robot_code="otherbot"))
