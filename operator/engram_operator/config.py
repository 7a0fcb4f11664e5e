"""kopf settings for the Engram operator, in one place (applied by the start-up handler)."""

from __future__ import annotations

import logging

import kopf

from engram_operator.resource import FINALIZER, GROUP

# Watch requests end server-side after this long and are re-opened; the client gives up a bit later.
# Without both, a silently dropped connection leaves the operator watching nothing (kopf#585).
# An int: kopf sends it as the watch's timeoutSeconds, and a real API server refuses "300.0" with 400 Bad
# Request (strconv.ParseInt), which stops the operator at start-up (found by tests/kube_real; KMock accepts it).
WATCH_SERVER_TIMEOUT = 300
WATCH_CLIENT_TIMEOUT = 330.0
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0


def configure(settings: kopf.OperatorSettings) -> None:
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = CONNECT_TIMEOUT
    settings.networking.request_timeout = REQUEST_TIMEOUT
    settings.networking.connect_timeout = CONNECT_TIMEOUT

    # Handler progress and the last handled spec go to annotations under our own prefix, so the status
    # holds only the fields the CRD declares (a strict schema would prune anything else).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)

    # One replica (Deployment strategy Recreate): kopf has no active-active mode, and peering would only
    # pause the extra replicas. So no peering objects and no RBAC for them.
    settings.peering.standalone = True

    settings.posting.reporting_component = "engram-operator"
    settings.posting.event_name_prefix = "engram-"
    settings.posting.level = logging.INFO

    # The Kubernetes client logs response bodies at DEBUG: with `kopf run --debug` that would print the
    # tenants' Secrets. Keep it quiet whatever the operator's log level.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
