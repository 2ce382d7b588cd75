"""The terminal commands: doctor, chat, demo, status, setup (cli.py parses the arguments)."""
