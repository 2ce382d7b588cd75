"""Helpers the tests share: a hand-driven clock, the recorded Dify transcripts. The end-to-end tests' own shared
pieces (config files, a running bot, pushing messages) are in tests/integration/harness.py."""
