"""`helm test` for Engram: one conversation through the chat Service, a new TCP connection per request.

Passes when every turn's reply recalls the previous user message verbatim (the echo model quotes it; the
check is skipped for other models) and the replies came from at least ENGRAM_TEST_MIN_PODS different pods.
Standard library only: it runs with the Engram image's Python, and the chart embeds it with `python -c`.

Environment: ENGRAM_TEST_URL (the chat Service), ENGRAM_TEST_TURNS, ENGRAM_TEST_MIN_PODS,
ENGRAM_TEST_AUTH ("required" or "disabled"), ENGRAM_API_KEY (when auth is required),
ENGRAM_TEST_CHECK_RECALL ("true" with the echo model).
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid


def fail(message):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def request(method, url, api_key, payload=None):
    """One request on a fresh connection (urllib opens one per call; Connection: close ends it)."""
    headers = {"Connection": "close", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    # The URL is the chart's own Service (http://), never user input.
    req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310
        body = response.read()
        return response.status, dict(response.headers), json.loads(body) if body else None


def chat(base, api_key, payload):
    """POST /v1/chat; a 503 (Redis briefly unavailable, a pod going away) is retried a few times."""
    for attempt in range(1, 6):
        try:
            return request("POST", f"{base}/v1/chat", api_key, payload)
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            if error.code != 503 or attempt == 5:
                fail(f"POST /v1/chat answered {error.code}: {detail}")
            print(f"  503 ({detail.strip()}), retrying", flush=True)
        except (urllib.error.URLError, OSError) as error:
            if attempt == 5:
                fail(f"POST /v1/chat failed: {error}")
            print(f"  {error}, retrying", flush=True)
        time.sleep(attempt)
    raise AssertionError("unreachable")


def pod_of(served_by):
    """served_by is "host:pid"; the host is the pod name."""
    return served_by.rsplit(":", 1)[0]


def main():
    base = os.environ["ENGRAM_TEST_URL"].rstrip("/")
    turns = int(os.environ.get("ENGRAM_TEST_TURNS", "12"))
    min_pods = int(os.environ.get("ENGRAM_TEST_MIN_PODS", "2"))
    api_key = os.environ.get("ENGRAM_API_KEY", "")
    check_recall = os.environ.get("ENGRAM_TEST_CHECK_RECALL", "true") == "true"
    if os.environ.get("ENGRAM_TEST_AUTH", "required") == "required" and not api_key:
        fail(
            "config.auth is 'required' but no API key was given: set tests.apiKeySecret.name, "
            "or add a memoryNamespaces entry (its Secret <name>-engram is used)"
        )
    if turns < 2:
        fail("tests.turns must be at least 2 to check recall")

    session = f"helm-test-{uuid.uuid4().hex[:12]}"
    print(f"conversation {session}: {turns} turns against {base}", flush=True)
    pods, forgotten, previous = set(), [], None
    for turn in range(1, turns + 1):
        message = f"turn {turn} of {session} says {uuid.uuid4().hex}"
        _, headers, reply = chat(base, api_key, {"session_id": session, "message": message})
        served_by = reply.get("served_by") or headers.get("X-Served-By") or headers.get("x-served-by") or ""
        if not served_by:
            fail(f"turn {turn}: neither served_by nor X-Served-By in the answer")
        pods.add(pod_of(served_by))
        recalled = previous is None or not check_recall or previous in reply.get("reply", "")
        if not recalled:
            forgotten.append(turn)
        cache = (reply.get("history") or {}).get("cache", "?")
        print(f"turn {turn:>3}: {served_by:<40} cache={cache:<5} recalled={'yes' if recalled else 'NO'}", flush=True)
        previous = message

    try:
        request("DELETE", f"{base}/v1/sessions/{session}", api_key)
    except (urllib.error.URLError, OSError) as error:
        print(f"note: could not delete the test session: {error}", flush=True)

    print(f"pods that answered: {len(pods)} ({', '.join(sorted(pods))})", flush=True)
    if forgotten:
        fail(f"turns {forgotten} did not recall the previous user message")
    if len(pods) < min_pods:
        fail(f"only {len(pods)} pod(s) answered, expected at least {min_pods}: is session affinity on?")
    print(f"PASS: {turns} turns, each recalled the previous one, served by {len(pods)} pods", flush=True)


if __name__ == "__main__":
    main()
