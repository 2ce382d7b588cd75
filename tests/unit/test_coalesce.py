from __future__ import annotations

from dingdifyd.pacing.coalesce import PATIENCE, UpdatePolicy

POLICY = UpdatePolicy(interval=0.5, min_chars=8)


def delay(**kw):
    base = {"now": 10.0, "last_sent_at": 9.9, "sent_chars": 10, "current_chars": 30, "changed": True}
    return POLICY.delay(**{**base, **kw})


def test_first_text_goes_out_at_once():
    assert delay(last_sent_at=None, sent_chars=0, current_chars=1) == 0.0


def test_nothing_to_send():
    assert delay(changed=False) is None
    assert delay(current_chars=0, sent_chars=0, last_sent_at=None) is None


def test_enough_new_text_waits_for_the_interval_only():
    assert delay(last_sent_at=9.9) == 0.5 - (10.0 - 9.9)
    assert delay(last_sent_at=9.0) == 0.0


def test_a_few_new_characters_wait_longer_but_not_forever():
    few = delay(current_chars=12, sent_chars=10, last_sent_at=10.0)
    assert few == POLICY.interval * PATIENCE
    assert delay(current_chars=12, sent_chars=10, last_sent_at=10.0 - POLICY.interval * PATIENCE) == 0.0


def test_a_shrinking_replacement_counts_as_a_full_change():
    assert delay(current_chars=5, sent_chars=30, last_sent_at=9.0) == 0.0
