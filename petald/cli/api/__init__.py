"""The local HTTP API (OpenAI-compatible and msgpack) on a Unix socket or a TCP port, and the
client-only daemon that serves it."""
