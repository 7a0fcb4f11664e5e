"""pre-delete hook: delete this release's sample MemoryNamespaces while the operator still runs.

Helm deletes custom resources after the operator's Deployment; without this, their finalizer would never
be removed and the tenants' Redis users would stay. Standard library only (runs in the Engram image).
Environment: NAMESPACE, SELECTOR (label selector), TIMEOUT_SECONDS.
"""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
API = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
PATH = f"/apis/engram.dev/v1alpha1/namespaces/{os.environ['NAMESPACE']}/memorynamespaces"
CONTEXT = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
with open(f"{ACCOUNT}/token") as token_file:
    TOKEN = token_file.read().strip()


def call(method, path):
    # Only ever the in-cluster API server (https://$KUBERNETES_SERVICE_HOST).
    request = urllib.request.Request(API + path, method=method, headers={"Authorization": f"Bearer {TOKEN}"})  # noqa: S310
    with urllib.request.urlopen(request, context=CONTEXT, timeout=30) as response:  # noqa: S310
        return json.load(response)


def names():
    query = urllib.parse.urlencode({"labelSelector": os.environ["SELECTOR"]})
    return [item["metadata"]["name"] for item in call("GET", f"{PATH}?{query}")["items"]]


def main():
    deadline = time.monotonic() + int(os.environ.get("TIMEOUT_SECONDS", "120"))
    remaining = names()
    for name in remaining:
        print(f"deleting MemoryNamespace {name}", flush=True)
        try:
            call("DELETE", f"{PATH}/{name}")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
    while remaining and time.monotonic() < deadline:
        time.sleep(2)
        remaining = names()
    if remaining:
        print(f"still terminating after the timeout: {remaining}; is the operator running?", flush=True)
        sys.exit(1)
    print("all sample MemoryNamespaces are gone", flush=True)


if __name__ == "__main__":
    main()
