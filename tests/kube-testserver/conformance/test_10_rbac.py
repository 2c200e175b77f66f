"""RBAC for ServiceAccount tokens: the TokenRequest API (`kubectl create token`) issues a token
that authenticates as the ServiceAccount, and what it may do is decided by the Roles,
ClusterRoles and bindings that were applied, with the apiserver's 403 messages."""

from conftest import assert_status, cm


def _sa_with_role(server, ns, rules):
    server.kubectl("-n", ns, "create", "serviceaccount", "robot")
    server.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
                {"metadata": {"name": "robot"}, "rules": rules})
    server.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
                {"metadata": {"name": "robot"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "robot"},
                 "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": ns}]})
    out = server.kubectl("-n", ns, "create", "token", "robot", "--duration=1h")
    return out.stdout.strip()


def _as(token):
    return {"Authorization": f"Bearer {token}"}


def test_token_request_issues_a_token_for_an_existing_service_account(server, ns):
    r = server.post(f"/api/v1/namespaces/{ns}/serviceaccounts/nobody/token", {"spec": {}})
    assert_status(r, 404, "NotFound", 'serviceaccounts "nobody" not found')
    server.kubectl("-n", ns, "create", "serviceaccount", "robot")
    r = server.post(f"/api/v1/namespaces/{ns}/serviceaccounts/robot/token",
                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})
    assert r.status == 201, r
    assert r.json["kind"] == "TokenRequest" and r.json["status"]["token"], r.json
    assert r.json["status"]["expirationTimestamp"], r.json
    r = server.post(f"/api/v1/namespaces/{ns}/serviceaccounts/robot/token", {"spec": {"expirationSeconds": 60}})
    assert_status(r, 422, "Invalid")


def test_service_account_is_allowed_what_its_role_grants(server, ns):
    token = _sa_with_role(server, ns, [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}])
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("c"))
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps/c", headers=_as(token))
    assert r.status == 200, r
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps", headers=_as(token))
    assert r.status == 200, r


def test_service_account_is_refused_what_its_role_does_not_grant(server, ns):
    token = _sa_with_role(server, ns, [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])
    user = f"system:serviceaccount:{ns}:robot"
    r = server.get(f"/api/v1/namespaces/{ns}/secrets", headers=_as(token))
    assert_status(r, 403, "Forbidden",
                  f'secrets is forbidden: User "{user}" cannot list resource "secrets" in API group "" in the namespace "{ns}"')
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("x"), headers=_as(token))
    assert_status(r, 403, "Forbidden")
    r = server.get("/api/v1/configmaps", headers=_as(token))
    assert_status(r, 403, "Forbidden",
                  f'configmaps is forbidden: User "{user}" cannot list resource "configmaps" in API group "" at the cluster scope')
    # A role in one namespace grants nothing in another.
    r = server.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt", headers=_as(token))
    assert_status(r, 403, "Forbidden")


def test_unknown_token_is_unauthorized(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps", headers=_as("not-a-token"))
    assert_status(r, 401, "Unauthorized")


def test_discovery_is_open_to_service_accounts(server, ns):
    token = _sa_with_role(server, ns, [])
    for path in ["/api", "/apis", "/version", "/openapi/v3"]:
        r = server.get(path, headers=_as(token))
        assert r.status == 200, (path, r)
