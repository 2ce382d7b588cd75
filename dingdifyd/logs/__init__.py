"""Logging: setup (journal-aware stderr), the journal's native protocol, structured fields."""
