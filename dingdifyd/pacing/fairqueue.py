"""Answers waiting for a turn at a Dify: oldest first, round-robin over people. Pure: no I/O, no clock.

Each person has a line of their own, and the people take turns in the order they started waiting: the next
answer is the oldest of the person whose turn it is, who then goes to the back of the turns (if they still
wait). So one person's flood of fifty questions does not hold up the next person's single one: it waits for
at most one answer of each person ahead of it, not for all fifty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


@dataclass
class FairQueue(Generic[T]):
    _lines: dict[str, deque[T]] = field(default_factory=dict)  # person -> their waiting items; order = turns

    def add(self, person: str, item: T) -> None:
        self._lines.setdefault(person, deque()).append(item)

    def remove(self, item: T) -> bool:
        """Take out an item that no longer waits (given up on); False when it was not there."""
        for person, line in self._lines.items():
            if item in line:
                line.remove(item)
                if not line:
                    del self._lines[person]
                return True
        return False

    def head(self) -> T | None:
        """The item whose turn is next, without taking it."""
        for line in self._lines.values():
            return line[0]
        return None

    def pop(self) -> T | None:
        """Take the item whose turn it is; its person goes to the back of the turns."""
        for person in self._lines:
            line = self._lines.pop(person)
            item = line.popleft()
            if line:
                self._lines[person] = line  # back of the turns
            return item
        return None

    def order(self) -> Iterator[T]:
        """Every waiting item, in the order they will be taken (if nothing else joins)."""
        lines = [list(line) for line in self._lines.values()]
        depth = max((len(line) for line in lines), default=0)
        for round_ in range(depth):
            for line in lines:
                if round_ < len(line):
                    yield line[round_]

    def places(self) -> dict[T, int]:
        """How many items are ahead of each."""
        return {item: ahead for ahead, item in enumerate(self.order())}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())
