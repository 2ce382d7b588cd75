"""The disk store on a real directory: what survives, what expires."""

from __future__ import annotations

from dingdifyd.store import DiskStore


def test_a_conversation_kept_zero_minutes_is_not_kept(tmp_path):
    store = DiskStore(tmp_path / "bot")
    try:
        store.set_conversation("helpdesk|single|u1", "conv-1", ttl=0)
        assert store.get_conversation("helpdesk|single|u1") is None  # 0: a new conversation every message
        store.set_conversation("helpdesk|single|u1", "conv-2", ttl=60)
        store.set_conversation("helpdesk|single|u1", "conv-3", ttl=0)
        assert store.get_conversation("helpdesk|single|u1") is None  # not the one kept before either
    finally:
        store.close()
