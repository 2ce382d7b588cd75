"""dingdifyd: DingTalk Stream robots answered by Dify apps, streaming into AI cards."""

__version__ = "0.1.0"
