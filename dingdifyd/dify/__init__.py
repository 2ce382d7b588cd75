"""Dify Service API adapter: async client, SSE decoding, typed events."""
