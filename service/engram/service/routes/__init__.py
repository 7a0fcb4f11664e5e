"""One router per concern: chat, sessions, operations (health, readiness, metrics) and the web page."""

from engram.service.routes import chat, ops, sessions, web

__all__ = ["chat", "ops", "sessions", "web"]
