"""``EngramMemory(summarize=True)`` against a real redis-server: what falls out of the window is folded into
the session's rolling summary off the caller's path (or now, with ``asummarize``), each message once,
and ``get()`` opens with the summary, its tokens counted against the limit."""

from __future__ import annotations

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine import SimpleChatEngine

from engram.llama_index import EngramMemory
from engram.llama_index.echo import EchoLLM
from engram.messages import SUMMARY_PREFIX


def memory_for(redis_url: str, **extra: object) -> EngramMemory:
    settings: dict[str, object] = {"token_limit": 300, "summary_max_tokens": 150, "summary_batch": 4}
    settings.update(extra)
    return EngramMemory(redis_url=redis_url, session_id="user:42", summarize=True, **settings)


def test_a_chat_engine_gets_summary_and_window_and_every_message_is_in_one_of_them(redis_url: str) -> None:
    memory = memory_for(redis_url)
    engine = SimpleChatEngine.from_defaults(llm=EchoLLM(), memory=memory)
    runs = []
    for n in range(40):
        engine.chat(f"note {n}")
        if memory.summarizing is not None and memory.summarizing not in runs:
            runs.append(memory.summarizing)
    assert runs, "the memory never summarized in the background"
    for run in runs:
        assert run.result(timeout=30).outcome in {"advanced", "nothing", "conflict"}
    memory.summarize_now()  # what the last turns pushed out

    history = memory.get()
    assert history[0].role == MessageRole.SYSTEM and (history[0].content or "").startswith(SUMMARY_PREFIX)
    tokens = sum(len(memory.tokenizer_fn(m.content or "")) for m in history)
    assert tokens <= memory.token_limit
    all_messages = memory.get_all()
    summary_text = (history[0].content or "").split("\n", 1)[1]
    header = summary_text.splitlines()[0]
    covered = int(header.split()[2])
    assert covered + len(history) - 1 == len(all_messages) == 80  # none lost, none in both
    assert [m.content for m in all_messages[covered:]] == [m.content for m in history[1:]]
    # the summary kept within its 150 tokens: the oldest folds gave way, the header still counts every message
    assert summary_text.splitlines()[1] == "… (earlier folds dropped)" and "note 0 " not in summary_text
    assert summary_text.endswith(f"note {(covered - 1) // 2}")
    reply = engine.chat("and now?").response
    assert header in reply  # the model was given the summary


async def test_asummarize_folds_what_fell_out_and_a_new_memory_sees_it(redis_url: str) -> None:
    memory = memory_for(redis_url, summary_batch=1000)  # no background run: only asummarize
    for n in range(30):
        await memory.aput(ChatMessage(role="user", content=f"question {n}"))
        await memory.aput(ChatMessage(role="assistant", content=f"answer {n}"))
    assert memory.summarizing is None
    advance = await memory.asummarize()
    assert advance.outcome == "advanced" and advance.messages > 0
    again = await memory.asummarize()
    assert again.outcome == "nothing"
    other = memory_for(redis_url)  # another process would see the same: the summary is in Redis
    history = await other.aget()
    assert (history[0].content or "").startswith(f"{SUMMARY_PREFIX}\n[summary of {advance.messages} messages")
    assert history[1].content == f"question {30 - (len(history) - 1) // 2}"


async def test_a_summary_llm_writes_the_summary(redis_url: str) -> None:
    memory = memory_for(redis_url, summary_llm=EchoLLM(), summary_batch=1000)
    for n in range(30):
        await memory.aput(ChatMessage(role="user", content=f"question {n}"))
        await memory.aput(ChatMessage(role="assistant", content=f"answer {n}"))
    await memory.asummarize()
    history = await memory.aget()
    # EchoLLM answers the summarizing prompt as it answers anything: proof that it, not the extract, wrote it
    assert (
        history[0].content or ""
    ) == f"{SUMMARY_PREFIX}\nThis is the start of our conversation. I was given 0 earlier messages."


def test_summary_settings_survive_serialization(redis_url: str) -> None:
    memory = memory_for(redis_url, summary_llm=EchoLLM())
    copy = EngramMemory.from_dict(memory.to_dict())
    assert (copy.summarize, copy.summary_max_tokens, copy.summary_batch) == (True, 150, 4)
    assert copy.summary_llm is None  # an LLM is not serialized: the copy uses the extract until given one
