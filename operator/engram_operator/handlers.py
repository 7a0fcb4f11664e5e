"""kopf handlers of the Engram operator. Run: ``kopf run --standalone --all-namespaces -m engram_operator.handlers``.

Thin on purpose: each handler calls a plain function of :mod:`engram_operator.reconcile`, writes the
status it returns, posts Events for what changed, and turns "retry later" into ``kopf.TemporaryError``.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from redis.exceptions import RedisError

from engram.errors import StoreUnavailable
from engram.history.functions import ensure_library
from engram.settings import get_settings
from engram_operator import config
from engram_operator.reconcile import REDIS_RETRY_SECONDS, Outcome, Runtime, finalize, reconcile
from engram_operator.resource import GROUP, PLURAL, VERSION

# Read once at import: kopf fixes a timer's interval when the handler is registered.
REPAIR_INTERVAL = get_settings().operator_repair_interval_seconds


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config.configure(settings)
    memo.runtime = await Runtime.start(get_settings())
    # The chat service's Redis user may not FUNCTION LOAD: load the library now, so chats work even
    # before the first tenant is reconciled (every reconcile checks it again).
    try:
        await ensure_library(memo.runtime.nodes.primary)
    except (StoreUnavailable, RedisError, OSError) as error:
        logging.getLogger(__name__).warning("could not load the Redis function library yet: %s", error)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.close()


def report(body: kopf.Body, patch: kopf.Patch, outcome: Outcome) -> None:
    current = body.get("status") or {}
    previous_phase = current.get("phase")
    if any(current.get(key) != value for key, value in outcome.status.items()):
        patch.status.update(outcome.status)  # only on change: a no-op patch still wakes every watcher
    if outcome.changes:
        kopf.info(body, reason="Reconciled", message="; ".join(outcome.changes))
    if outcome.phase != "Ready" and outcome.phase != previous_phase:
        kopf.warn(body, reason=outcome.status["conditions"][0]["reason"], message=outcome.message)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.message, delay=outcome.retry_after)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_namespace(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    report(body, patch, await reconcile(memo.runtime, body))


@kopf.timer(GROUP, VERSION, PLURAL, interval=REPAIR_INTERVAL, initial_delay=REPAIR_INTERVAL)
async def repair_drift(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Re-apply everything (ACL users lost on a Redis restart or failover, a deleted record or Secret)
    and refresh the session count."""
    report(body, patch, await reconcile(memo.runtime, body))


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_namespace(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    try:
        done = await finalize(memo.runtime, body)
    except StoreUnavailable as error:
        delay = min(REDIS_RETRY_SECONDS, memo.runtime.settings.operator_repair_interval_seconds)
        raise kopf.TemporaryError(f"cannot clean up yet: {error}", delay=delay) from error
    logger.info("MemoryNamespace removed: %s", "; ".join(done) or "nothing to clean up")
