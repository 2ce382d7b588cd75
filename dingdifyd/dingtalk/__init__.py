"""DingTalk adapter: the Stream connection (the only user of the dingtalk-stream SDK), tokens, cards, replies."""
