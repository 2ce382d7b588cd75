"""The fallback ladder's memory (which rung a new card starts on) and its words (causes, fix hints)."""

from __future__ import annotations

import logging

from dingdifyd.dingtalk.fallback import CauseLog, TemplateMemory, describe, hint_for
from dingdifyd.errors import DingTalkError, DingTalkPermissionDenied, DingTalkUnavailable
from tests.support.clock import FakeClock

PERMISSION = "Forbidden.AccessDenied.AccessTokenPermissionDenied"


def test_hints_name_the_fix():
    assert "Card.Streaming.Write / Card.Instance.Write" in hint_for(PERMISSION)
    assert "developer console" in hint_for(PERMISSION)
    assert hint_for(PERMISSION, required_scopes=("Card.Streaming.Write",)).startswith("grant Card.Streaming.Write ")
    assert "publish the template" in hint_for("param.templateUnpublished")
    assert "remove dingtalk_ai_card_template_id" in hint_for("param.templateUnpublished")
    assert "remove it" in hint_for("param.templateNotExist")
    assert "dingtalk_api_monthly_budget" in hint_for("Forbidden.AccessDenied.ApiCountLimitForOrg")
    assert "dingtalk_card_qps" in hint_for("Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
    assert "expired" in hint_for("300002")
    assert "busy" in hint_for("system.busy", status=500)
    assert hint_for("param.somethingNew", status=400) == ""


def test_describe_uses_the_required_scopes_dingtalk_names():
    denied = DingTalkPermissionDenied("refused", status=403, code=PERMISSION, required_scopes=("Card.Instance.Write",))
    cause, hint = describe(denied)
    assert cause == PERMISSION
    assert hint.startswith("grant Card.Instance.Write ")
    cause, hint = describe(DingTalkUnavailable("DingTalk card.streaming: no answer within 10s"))
    assert cause == "DingTalkUnavailable" and "network" in hint


def test_each_cause_is_logged_once_at_warning_then_at_debug(caplog):
    caplog.set_level(logging.DEBUG)
    causes = CauseLog(logging.getLogger("test.causes"))
    refused = DingTalkError("no such template", status=400, code="param.templateNotExist")
    assert causes.failed("creating a card", refused, "using the built-in template")
    assert not causes.failed("creating a card", refused, "using the built-in template")
    assert causes.failed("ending a card", refused, "replying instead")  # another stage, another cause
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "test.causes"]
    assert [level for level, _ in levels] == [logging.WARNING, logging.DEBUG, logging.WARNING]
    first = levels[0][1]
    assert ("creating a card failed (DingTalkError 400 param.templateNotExist: no such template); using the "
            "built-in template") in first
    assert "Fix: check dingtalk_ai_card_template_id" in first


def test_a_refused_template_is_skipped_for_a_while_then_tried_again():
    clock = FakeClock()
    memory = TemplateMemory("tpl.schema", cooldown=600, clock=clock)
    assert memory.rungs() == ["configured", "builtin"]
    assert memory.refused("configured", "param.templateUnpublished") == "builtin"
    assert memory.rungs() == ["builtin"]
    clock.now += 601  # published meanwhile? try it again
    assert memory.rungs() == ["configured", "builtin"]


def test_refusals_no_template_avoids_switch_cards_off_for_a_while():
    clock = FakeClock()
    memory = TemplateMemory("tpl.schema", cooldown=600, clock=clock)
    assert memory.refused("configured", PERMISSION) is None
    assert memory.rungs() == []  # plain replies
    clock.now += 601
    assert memory.rungs() == ["configured", "builtin"]


def test_other_refusals_end_the_ladder_for_this_answer_only():
    memory = TemplateMemory(None, clock=FakeClock())
    assert memory.rungs() == ["builtin"]
    assert memory.refused("builtin", "param.openSpaceIdInvalid") is None  # e.g. an external contact
    assert memory.refused("builtin", "param.templateNotExist") is None  # no built-in template here
    assert memory.rungs() == ["builtin"]
