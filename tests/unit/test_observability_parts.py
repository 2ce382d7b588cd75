"""The pure parts behind `status` and the metrics: socket paths, listen addresses, counting and adding up."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dingdifyd import config
from dingdifyd.errors import ConfigError, DifyTimeout, DifyTotalTimeout, DingTalkError
from dingdifyd.metrics import Recorder, call_result, dify_error_kind
from dingdifyd.pacing.backoff import Backoff
from dingdifyd.paths import instance_name, served_status_socket, status_socket_candidates
from dingdifyd.supervisor.endpoints import parse_listen
from dingdifyd.supervisor.exposition import BotMetrics, BotTotals, render
from dingdifyd.supervisor.live import LiveView
from dingdifyd.supervisor.state import BotLifecycle


def test_the_status_socket_is_where_systemd_puts_the_runtime_directory():
    env = {"RUNTIME_DIRECTORY": "/run/dingdifyd/hr", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert served_status_socket("/etc/dingdifyd/hr.yaml", None, env) == "/run/dingdifyd/hr/status.sock"
    assert served_status_socket("/home/a/hr.yaml", None, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == \
        "/run/user/1000/dingdifyd/hr.status.sock"  # fmt: skip
    assert served_status_socket("/home/a/hr.yaml", None, {}) is None
    assert served_status_socket("/etc/dingdifyd/hr.yaml", "/srv/s.sock", env) == "/srv/s.sock"
    assert served_status_socket("/etc/dingdifyd/hr.yaml", "off", env) is None
    # the command finds it from the instance name, without systemd's variables
    assert status_socket_candidates("/etc/dingdifyd/hr.yaml", None, {})[0] == "/run/dingdifyd/hr/status.sock"
    assert status_socket_candidates("hr.yaml", None, {"XDG_RUNTIME_DIR": "/x"})[1] == "/x/dingdifyd/hr.status.sock"
    assert instance_name("/etc/dingdifyd/dingdifyd.yaml") == "dingdifyd"


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:9464", ("tcp", ("127.0.0.1", 9464))),
    ("[::1]:9464", ("tcp", ("::1", 9464))),
    ("unix:/run/dingdifyd/hr/metrics.sock", ("unix", "/run/dingdifyd/hr/metrics.sock")),
])  # fmt: skip
def test_listen_addresses(text, parsed):
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["9464", "127.0.0.1:0", "127.0.0.1:70000", "host:port", "unix:relative"])
def test_bad_listen_addresses_are_config_errors_naming_the_key(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"metrics_listen: '{text}'\nbots: [{{name: a, dingtalk_app_client_id: x, "
                    "dingtalk_app_client_secret: s, dify_app_type: chatbot, dify_app_api_key: k}]\n")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        config.load(path, environ={})
    assert any(problem.startswith("metrics_listen: ") for problem in error.value.problems), error.value.problems


def test_metrics_are_off_by_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bots: [{name: a, dingtalk_app_client_id: x, dingtalk_app_client_secret: s, "
                    "dify_app_type: chatbot, dify_app_api_key: k}]\n")  # fmt: skip
    loaded = config.load(path, environ={})
    assert loaded.metrics_listen is None and loaded.status_socket is None


def test_call_results_and_error_kinds():
    assert call_result(200, "") == "ok"
    assert call_result(403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi") == "rate_limited"
    assert call_result(403, "Forbidden.AccessDenied.AccessTokenPermissionDenied") == "forbidden"
    assert call_result(None, "") == "unreachable"
    assert (call_result(404, "x"), call_result(502, "")) == ("client_error", "server_error")
    assert dify_error_kind(DifyTotalTimeout("x")) == "total_timeout"
    assert dify_error_kind(DifyTimeout("x")) == "timeout"
    assert dify_error_kind(DingTalkError("x")) is None


def test_a_bots_counts_survive_its_processes():
    totals = BotTotals()
    first = Recorder()
    first.count("dingdifyd_answers", outcome="answered")
    first.observe("dingdifyd_answer_seconds", 1.5)
    totals.report(first.snapshot())
    totals.process_ended()
    second = Recorder()
    second.count("dingdifyd_answers", outcome="answered")
    second.observe("dingdifyd_answer_seconds", 700.0)
    totals.report(second.snapshot())
    text = render([BotMetrics("hr", totals, {"dingdifyd_bot_up": 1.0})]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    assert samples[("dingdifyd_answers_total", (("bot", "hr"), ("outcome", "answered")))] == 2
    assert samples[("dingdifyd_answer_seconds_count", (("bot", "hr"),))] == 2
    assert samples[("dingdifyd_answer_seconds_sum", (("bot", "hr"),))] == 701.5
    assert samples[("dingdifyd_answer_seconds_bucket", (("bot", "hr"), ("le", "2.0")))] == 1
    assert samples[("dingdifyd_answer_seconds_bucket", (("bot", "hr"), ("le", "1200.0")))] == 2
    assert samples[("dingdifyd_bot_up", (("bot", "hr"),))] == 1


def test_a_malformed_snapshot_is_left_out():
    totals = BotTotals()
    totals.report({"c": [["dingdifyd_answers", [["outcome", "answered"]], 3], ["nope"], ["unknown_family", [], 1]],
                   "h": [["dingdifyd_answer_seconds", [], [1, 2]]]})  # fmt: skip
    assert totals.counters() == {("dingdifyd_answers", (("outcome", "answered"),)): 3.0}
    assert totals.histograms() == {}
    with pytest.raises(ValueError):
        Recorder().count("dingdifyd_answers", user="alice")  # labels are a closed set


def test_a_bot_that_connected_shows_it_before_its_first_report():
    """The status is live: a bot process's `connected` message counts at once, not only its next heartbeat's
    report (which comes seconds later)."""
    clock = iter(range(100, 200)).__next__
    lifecycle = BotLifecycle("hr", clock=lambda: 0.0, backoff=Backoff(), heartbeat_timeout=30, kill_grace=5)
    view = LiveView("/etc/dingdifyd/ci.yaml", now=lambda: float(clock()))
    lifecycle.spawned()
    view.spawned("hr", 1234)
    lifecycle.connected()
    view.connected("hr", True)

    def bot() -> dict:
        document = view.status_document({"hr": lifecycle}, ["hr"], status_line="", ready=True, stopping=False,
                                        monotonic_now=0.0)  # fmt: skip
        return document["bots"][0]

    connected_at = bot()["connected_since"]
    assert bot()["state"] == "running" and connected_at is not None
    view.reported("hr", {"status": {"answered_today": 1}})  # a report without its own time keeps it
    assert bot()["connected_since"] == connected_at and bot()["answered_today"] == 1
    lifecycle.disconnected()
    view.connected("hr", False)
    assert bot()["connected_since"] is None
