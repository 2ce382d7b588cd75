"""The README's commands, as the tests run them: a shell block marked `<!-- test: NAME -->` on the line above."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def block(name: str) -> list[str]:
    """The lines of the ```sh block right after `<!-- test: NAME -->` in README.md."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^<!-- test: {re.escape(name)} -->\n```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no block marked <!-- test: {name} -->"
    return match.group(1).rstrip("\n").split("\n")
