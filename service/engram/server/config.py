"""Checks of the settings that pydantic cannot make alone (kept light: no FastAPI or LlamaIndex import,
so a bad configuration is reported in a fraction of a second)."""

from __future__ import annotations

from engram.settings import Settings


class ConfigurationError(ValueError):
    """Settings that cannot work together (raised before the service starts)."""


def check_llm_settings(settings: Settings) -> None:
    """Raise :class:`ConfigurationError` when the model settings cannot work."""
    if settings.llm == "openai-like":
        required = (("ENGRAM_LLM_BASE_URL", settings.llm_base_url), ("ENGRAM_LLM_MODEL", settings.llm_model))
        missing = [name for name, value in required if not value]
        if missing:
            raise ConfigurationError(f"ENGRAM_LLM=openai-like needs {' and '.join(missing)}")
        if not str(settings.llm_base_url).startswith(("http://", "https://")):
            raise ConfigurationError(
                f"ENGRAM_LLM_BASE_URL must be an http(s) URL such as http://127.0.0.1:11434/v1, "
                f"got {settings.llm_base_url!r}"
            )
