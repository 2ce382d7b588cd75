"""The simulators every end-to-end test talks to. A test module that needs other settings overrides a fixture.

`dify` is a fake Dify 0.15.3 (what the older tests were written against); `any_dify` is one per Dify version the
bridge supports, so a test that uses it runs against each (`[dify-0.15.3]`, `[dify-1.16.1]`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from dingdifyd.simulator.dify import VERSIONS, FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import fake_dingtalk


@pytest.fixture
async def dingtalk() -> AsyncIterator[FakeDingTalk]:
    """A fake DingTalk with the test app registered, at DingTalk's real 20 calls/s per API; no pings, no
    redelivery unless a test asks for one."""
    async with fake_dingtalk() as fake:
        yield fake


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    """A fake Dify with one app of each type (keys `app-fake-<type>`), answering fast."""
    fake = await start_fake_dify(default_apps=True)
    for key in list(fake.apps):
        fake.configure(key, token_delay=0.002)
    yield fake
    await fake.close()


@pytest.fixture(params=VERSIONS, ids=lambda version: f"dify-{version}")
async def any_dify(request: pytest.FixtureRequest) -> AsyncIterator[FakeDify]:
    """A fake Dify of each supported version in turn, with one app of each type, answering fast."""
    fake = await start_fake_dify(default_apps=True, version=request.param)
    for key in list(fake.apps):
        fake.configure(key, token_delay=0.002)
    yield fake
    await fake.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for tests that call an adapter directly."""
    async with aiohttp.ClientSession() as session:
        yield session
