"""ChatMessage <-> Engram message conversion. Plain text travels as content; anything richer
(additional_kwargs, non-text blocks) is kept whole as JSON in the message's ``extra`` field."""

from __future__ import annotations

import json

from llama_index.core.base.llms.types import ChatMessage, TextBlock

from engram.messages import NewMessage, StoredMessage


def to_new_message(message: ChatMessage) -> NewMessage:
    role = message.role.value if hasattr(message.role, "value") else str(message.role)
    text_only = all(isinstance(block, TextBlock) for block in message.blocks)
    extra = None
    if not text_only:
        extra = json.dumps({"message": message.model_dump(mode="json")})
    elif message.additional_kwargs:
        extra = json.dumps({"additional_kwargs": message.additional_kwargs}, default=str)
    return NewMessage(role=role, content=message.content or "", extra=extra)


def to_chat_message(message: StoredMessage) -> ChatMessage:
    if message.extra:
        extra = json.loads(message.extra)
        if "message" in extra:
            return ChatMessage.model_validate(extra["message"])
        return ChatMessage(
            role=message.role, content=message.content, additional_kwargs=extra.get("additional_kwargs", {})
        )
    return ChatMessage(role=message.role, content=message.content)
