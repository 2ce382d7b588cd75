"""A bounded memory of ids already seen: to say something once per message or frame, not once per delivery."""

from __future__ import annotations


class RecentIds:
    """The last `size` ids added, oldest forgotten first."""

    def __init__(self, size: int):
        self._size = size
        self._ids: dict[str, None] = {}

    def add(self, item: str) -> bool:
        """True when `item` is new."""
        if item in self._ids:
            return False
        self._ids[item] = None
        if len(self._ids) > self._size:
            del self._ids[next(iter(self._ids))]
        return True

    def __contains__(self, item: object) -> bool:
        return item in self._ids
