"""One router per concern: chat, sessions, operations (health, readiness, metrics) and the web page."""

from engram.server.routes import chat, ops, sessions, web

__all__ = ["chat", "ops", "sessions", "web"]
