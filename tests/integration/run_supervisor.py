"""`python -m tests.integration.run_supervisor CONFIG [BOT...]`: the real Arbiter, with the test child targets."""

from __future__ import annotations

import sys

from dingdifyd.logs.setup import setup_logging
from dingdifyd.supervisor.arbiter import Arbiter
from tests.integration.child_targets import dispatch


def main(argv: list[str]) -> int:
    setup_logging("INFO")
    return Arbiter(argv[0], bot_names=argv[1:] or None, target=dispatch).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
