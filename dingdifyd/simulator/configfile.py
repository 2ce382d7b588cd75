"""Configuration files that point a daemon at the simulators: shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def bot_entry(
    name: str, *, client_id: str, client_secret: str, app_type: str, dify_key: str, **more: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "dingtalk_app_client_id": client_id,
        "dingtalk_app_client_secret": client_secret,
        "dify_app_type": app_type,
        "dify_app_api_key": dify_key,
        **more,
    }


def write_config(
    path: Path, *, dingtalk_url: str, dify_url: str, state_dir: Path, bots: list[dict[str, Any]], **top: Any
) -> Path:
    """Write a config whose every DingTalk and Dify address is a simulator's; readable by its owner only."""
    doc: dict[str, Any] = {
        "dify_open_api_url": dify_url,
        "dingtalk_api_base": dingtalk_url,
        "dingtalk_oapi_base": dingtalk_url,
        "state_dir": str(state_dir),
        **top,
        "bots": bots,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    path.chmod(0o600)
    return path
