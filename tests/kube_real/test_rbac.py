"""The chart's RBAC as the real API server's authorizer sees it: the operator's ServiceAccount may do exactly
what docs/deploy.md lists, and the chat service's ServiceAccount nothing at all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kube_real.conftest import ROOT, ControlPlane, Release

pytestmark = pytest.mark.kube_real

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# The rules every authenticated identity has (system:basic-user, system:discovery, ...): not the chart's doing.
DEFAULT_RESOURCES = {
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
    "selfsubjectreviews.authentication.k8s.io",
}


def documented_operator_rules() -> dict[str, set[str]]:
    """docs/deploy.md's table of the operator's ClusterRole: {"resource.group": {verbs}}."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    table = text[text.index("| API group | Resource | Verbs | Used by |") :]
    rules: dict[str, set[str]] = {}
    for line in (raw.strip() for raw in table.splitlines()[2:]):
        if not line.startswith("|"):
            break
        group, resource, verbs = (cell.strip() for cell in line.strip("|").split("|")[:3])
        group = "" if group == '""' else group
        # Named as kubectl's rules review names them: "memorynamespaces.engram.dev/status".
        plural, _, subresource = resource.partition("/")
        key = (f"{plural}.{group}" if group else plural) + (f"/{subresource}" if subresource else "")
        rules[key] = {v.strip() for v in verbs.split(",")}
    assert len(rules) >= 5, rules
    return rules


def can_i(plane: ControlPlane, who: str, verb: str, resource: str, *scope: str) -> bool:
    # "memorynamespaces.engram.dev/status": can-i reads "<resource>/<name>", so the subresource goes apart.
    target, _, subresource = resource.partition("/")
    extra = [f"--subresource={subresource}"] if subresource else []
    result = plane.kubectl("auth", "can-i", verb, target, *extra, f"--as={who}", *scope, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def granted_rules(plane: ControlPlane, who: str, namespace: str) -> dict[str, set[str]]:
    """What the authorizer's rules review lists for ``who`` in ``namespace`` (resource rules only)."""
    out = plane.kubectl("auth", "can-i", "--list", f"--as={who}", "-n", namespace).stdout
    rules: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        if line.lstrip().startswith("["):
            continue  # a non-resource URL (/healthz, /version, ...): everyone's
        match = re.match(r"(\S+)\s+(\[.*?\])\s+(\[.*?\])\s+(\[.*?\])", line)
        assert match, line
        resource, urls, names, verbs = match.groups()
        assert urls == "[]", line
        assert names == "[]", f"a rule limited to names: {line}"
        rules.setdefault(resource, set()).update(verbs.strip("[]").split())
    return rules


def test_the_operator_serviceaccount_may_do_exactly_what_docs_deploy_md_lists(
    plane: ControlPlane, release: Release
) -> None:
    who = f"system:serviceaccount:{release.namespace}:{release.operator_service_account}"
    documented = documented_operator_rules()
    # Every verb on every documented resource: allowed cluster-wide exactly when documented.
    for resource, verbs in documented.items():
        for verb in VERBS:
            allowed = can_i(plane, who, verb, resource, "--all-namespaces")
            assert allowed == (verb in verbs), f"{verb} {resource}: {'allowed' if allowed else 'denied'}"
    # And nothing else: the authorizer's own list of rules, in the release's namespace and in another one.
    for namespace in (release.namespace, "default"):
        granted = granted_rules(plane, who, namespace)
        for resource in DEFAULT_RESOURCES:
            granted.pop(resource, None)
        assert granted == documented, namespace


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("list", "secrets"),  # cluster-wide reading of every Secret is what an operator must never get
        ("watch", "secrets"),
        ("update", "secrets"),
        ("create", "pods"),
        ("get", "pods"),
        ("patch", "deployments.apps"),
        ("create", "deployments.apps"),
        ("list", "configmaps"),
        ("list", "namespaces"),
        ("create", "serviceaccounts/token"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "leases.coordination.k8s.io"),  # standalone: no peering, no leader election
        ("update", "memorynamespaces.engram.dev"),
        ("delete", "memorynamespaces.engram.dev"),
        ("create", "memorynamespaces.engram.dev"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("patch", "events"),
    ],
)
def test_the_operator_serviceaccount_is_refused_what_it_must_not_do(
    plane: ControlPlane, release: Release, verb: str, resource: str
) -> None:
    who = f"system:serviceaccount:{release.namespace}:{release.operator_service_account}"
    assert not can_i(plane, who, verb, resource, "--all-namespaces")
    assert not can_i(plane, who, verb, resource, "-n", release.namespace)


def test_the_chat_serviceaccount_can_do_nothing(plane: ControlPlane, release: Release) -> None:
    who = f"system:serviceaccount:{release.namespace}:{release.chat_service_account}"
    for namespace in (release.namespace, "default"):
        granted = granted_rules(plane, who, namespace)
        assert set(granted) <= DEFAULT_RESOURCES, granted
    for resource in ("secrets", "configmaps", "pods", "memorynamespaces.engram.dev", "events"):
        for verb in ("get", "list", "create"):
            assert not can_i(plane, who, verb, resource, "-n", release.namespace), f"{verb} {resource}"
    # And its pods get no token to try with.
    chat = plane.get("deployment", f"{release.fullname}-chat", "-n", release.namespace)
    assert chat["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_a_token_of_the_operator_serviceaccount_reads_memorynamespaces_but_not_pods(
    plane: ControlPlane, release: Release, tmp_path: Path
) -> None:
    """Not only impersonation: a real token of the ServiceAccount, as the pod gets it, is authorised the same."""
    config = plane.service_account_kubeconfig(release.namespace, release.operator_service_account, tmp_path / "kc")
    plane.kubectl("get", "memorynamespaces", "--all-namespaces", kubeconfig=config)
    refused = plane.kubectl("get", "pods", "-n", release.namespace, kubeconfig=config, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr
    refused = plane.kubectl("get", "secrets", "--all-namespaces", kubeconfig=config, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr
