"""The disk store on a real directory: what survives, what expires."""

from __future__ import annotations

import os

import pytest

from dingdifyd.errors import ConfigError
from dingdifyd.store.disk import DiskStore


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


@pytest.mark.parametrize("shared", ["state", "bot"])
def test_a_state_directory_others_may_write_is_refused(tmp_path, shared):
    state = tmp_path / "state"
    (state / "bot").mkdir(parents=True)
    state.chmod(0o700)
    (state / shared if shared == "bot" else state).chmod(0o777)  # e.g. made in /tmp by someone else
    with pytest.raises(ConfigError) as refused:
        DiskStore(state / "bot")
    assert "writable by other users" in str(refused.value)
    assert not (state / "bot" / "state").exists()  # nothing in it was opened (diskcache unpickles)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_state_directory_of_another_account_is_refused(tmp_path):
    state = tmp_path / "state"
    (state / "bot").mkdir(parents=True, mode=0o700)
    os.chown(state / "bot", 65534, 65534)  # nobody
    with pytest.raises(ConfigError) as refused:
        DiskStore(state / "bot")
    assert "owned by uid 65534" in str(refused.value)


def test_a_new_state_directory_is_private(tmp_path):
    store = DiskStore(tmp_path / "state" / "bot")
    store.close()
    assert (tmp_path / "state" / "bot").stat().st_mode & 0o077 == 0
