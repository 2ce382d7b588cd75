"""`dingdifyd setup NAME` against the simulators: the QR-code registration as the fake DingTalk records it, the
Dify checks, the files it writes, and the daemon running on what it wrote."""

from __future__ import annotations

import asyncio
import io
import stat
from pathlib import Path

import pytest

from dingdifyd import config
from dingdifyd.commands.setup import qr_text, setup_main
from dingdifyd.simulator.dify import FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import CLIENT_ID, CLIENT_SECRET, ask, dify_key, running_bot

pytestmark = pytest.mark.timeout(60)
WAIT = 20.0


class Admin:
    """The person at the terminal: answers typed in advance, the output read as it comes."""

    def __init__(self, *answers: str):
        self.stdin = io.StringIO("".join(f"{a}\n" for a in answers))
        self.out = io.StringIO()

    @property
    def said(self) -> str:
        return self.out.getvalue()


async def run_setup(tmp_path: Path, dingtalk: FakeDingTalk, admin: Admin, **options) -> asyncio.Task[int]:
    return asyncio.create_task(setup_main(
        "hr", admin.stdin, admin.out, config_dir=str(tmp_path / "etc"), api_base=dingtalk.base_url,
        oapi_base=dingtalk.base_url, systemd_dir=str(tmp_path / "systemd"), **options,
    ))  # fmt: skip


async def scanned(dingtalk: FakeDingTalk) -> str:
    """The user code of the registration the setup began, once it polls."""

    async def wait() -> str:
        while not any(s.polls for s in dingtalk.registration.sessions.values()):
            await asyncio.sleep(0.05)
        [session] = dingtalk.registration.sessions.values()
        return session.user_code

    return await asyncio.wait_for(wait(), WAIT)


async def test_a_new_app_by_qr_code_then_the_bot_answers_with_what_was_written(tmp_path, dingtalk, dify):
    admin = Admin("", "1", dify.base_url, dify_key("workflow"), "2")  # bot name hr; QR; Dify; secrets as files
    setup = await run_setup(tmp_path, dingtalk, admin)
    user_code = await scanned(dingtalk)
    client_id, secret = dingtalk.registration.approve(user_code)
    assert await asyncio.wait_for(setup, WAIT) == 0, admin.said

    [session] = dingtalk.registration.sessions.values()
    assert session.polls and dingtalk.registration.init_requests == [{}]
    url = f"https://open-dev.dingtalk.com/openapp/registration/openClaw?user_code={user_code}"
    assert f"Or open: {url}" in admin.said
    assert qr_text(url) in admin.said  # the code on the screen is the URL's
    assert f"DingTalk created the app {client_id}" in admin.said
    assert "Dify app 'fake-workflow': a workflow app" in admin.said
    assert "FAIL" not in admin.said and "\n0 FAIL" not in admin.said
    assert secret not in admin.said and dify_key("workflow") not in admin.said

    path = tmp_path / "etc" / "hr.yaml"
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, "the config is readable by others"
    text = path.read_text()
    assert secret not in text and dify_key("workflow") not in text
    loaded = config.load(path, environ={})
    [bot] = loaded.bots
    assert (bot.name, bot.dingtalk.client_id, bot.dify.app_type) == ("hr", client_id, "workflow")
    assert bot.dingtalk.client_secret.reveal() == secret
    secret_file = tmp_path / "etc" / "hr.hr.dingtalk_app_client_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o640

    # the daemon's bot process, on that file: connected with the new app, answering
    async with running_bot(path, "hr"):
        card = await ask(dingtalk, "hello new app", client_id=client_id, timeout=WAIT)
    assert "hello new app" in card.final_content


@pytest.mark.parametrize("outcome", ["refused", "expired"])
async def test_a_refused_or_lapsed_scan_says_what_to_do_and_goes_on_with_existing_credentials(
    tmp_path, dingtalk, dify, outcome
):
    admin = Admin("", "1", CLIENT_ID, CLIENT_SECRET, dify.base_url, dify_key("chatbot"), "1")
    setup = await run_setup(tmp_path, dingtalk, admin)
    user_code = await scanned(dingtalk)
    if outcome == "refused":
        dingtalk.registration.deny(user_code, "用户拒绝授权")
    else:
        dingtalk.registration.expire(user_code)
    assert await asyncio.wait_for(setup, WAIT) == 0, admin.said
    said = admin.said
    assert ("did not complete: 用户拒绝授权" if outcome == "refused" else "did not complete: the code expired") in said
    assert "Create the app in the DingTalk developer console instead" in said
    assert f"The app {CLIENT_ID} got an access token." in said
    # systemd credentials: root-only files, a drop-in naming them, nothing secret in the config
    etc = tmp_path / "etc"
    key_file = etc / "credentials" / "hr.dify_app_api_key"
    assert key_file.read_text().strip() == dify_key("chatbot") and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    drop_in = (tmp_path / "systemd" / "dingdifyd@hr.service.d" / "credentials.conf").read_text()
    assert f"LoadCredential=hr.dify_app_api_key:{key_file}" in drop_in
    assert f"LoadCredential=hr.dingtalk_app_client_secret:{etc / 'credentials' / 'hr.dingtalk_app_client_secret'}" \
        in drop_in  # fmt: skip
    assert CLIENT_SECRET not in (etc / "hr.yaml").read_text()
    # as the service sees it: the credentials in $CREDENTIALS_DIRECTORY
    loaded = config.load(etc / "hr.yaml", environ={"CREDENTIALS_DIRECTORY": str(etc / "credentials")})
    assert loaded.bots[0].dify.api_key.reveal() == dify_key("chatbot")


async def test_an_existing_config_is_never_replaced_without_asking(tmp_path, dingtalk, dify):
    path = tmp_path / "etc" / "hr.yaml"
    path.parent.mkdir()
    path.write_text("# the admin's own\n")
    admin = Admin("")  # Enter: the default, no
    assert await setup_main("hr", admin.stdin, admin.out, config_dir=str(tmp_path / "etc")) == 1
    assert "exists. Replace it (y/N)" in admin.said and "Nothing written" in admin.said
    assert path.read_text() == "# the admin's own\n"
    assert not dingtalk.registration.sessions


async def test_wrong_credentials_are_asked_again_and_the_end_of_input_writes_nothing(tmp_path, dingtalk, dify):
    admin = Admin("", "2", CLIENT_ID, "not-the-secret")
    assert await setup_main("hr", admin.stdin, admin.out, config_dir=str(tmp_path / "etc"),
                            api_base=dingtalk.base_url) == 1  # fmt: skip
    assert "DingTalk refused that Client ID and Secret." in admin.said
    assert "nothing written" in admin.said
    assert not (tmp_path / "etc").exists() or not any((tmp_path / "etc").iterdir())


@pytest.fixture
async def dify() -> FakeDify:
    from dingdifyd.simulator.dify import start_fake_dify

    fake = await start_fake_dify(default_apps=True, info_with_mode=True)
    for key in list(fake.apps):
        fake.configure(key, token_delay=0.002)
    yield fake
    await fake.close()
