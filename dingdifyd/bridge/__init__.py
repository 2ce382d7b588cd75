"""The bridge between a chat message and a Dify answer. Knows neither aiohttp nor the DingTalk SDK."""
