"""Item 4: the status subresource and other subresources.

The main resource's update strategy copies the old `status` over the new one (a PUT/PATCH of
the main resource never changes status); the `status` subresource's strategy does the reverse
and copies the old `spec` (for Pods also `metadata.ownerReferences` and `deletionTimestamp`;
labels and annotations DO change through pods/status: `podStatusStrategy.PrepareForUpdate`
resets only spec, deletionTimestamp and ownerReferences). Resources without the subresource
(ConfigMap) answer 404. `pods/log` is proxied to the pod's node's kubelet; for a pod bound to a
Node that does not exist the apiserver answers 404 `nodes "<node>" not found` (there is no
kubelet to reach, which the test server shares with such a cluster).
"""

import json

from conftest import assert_status, cm, pod, svc, uniq


def _pods(ns, name="", sub=""):
    p = f"/api/v1/namespaces/{ns}/pods"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


def _svcs(ns, name="", sub=""):
    p = f"/api/v1/namespaces/{ns}/services"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


def test_put_pod_main_resource_ignores_status(server, ns):
    created = server.post(_pods(ns), pod("p", node="node-1")).json
    created["status"] = {"phase": "Running", "message": "from main"}
    created["metadata"]["labels"] = {"changed": "yes"}
    r = server.put(_pods(ns, "p"), created)
    assert r.status == 200, r
    assert r.json["status"].get("phase") == "Pending", r.json
    assert "message" not in r.json["status"]
    assert r.json["metadata"]["labels"] == {"changed": "yes"}
    live = server.get(_pods(ns, "p")).json
    assert live["status"].get("phase") == "Pending"


def test_patch_pod_main_resource_ignores_status(server, ns):
    server.post(_pods(ns), pod("p", node="node-1"))
    r = server.patch(_pods(ns, "p"), {"status": {"phase": "Running"}})
    assert r.status == 200, r
    assert r.json["status"].get("phase") == "Pending", r.json


def test_patch_service_main_resource_ignores_status(server, ns):
    server.post(_svcs(ns), svc("s"))
    r = server.patch(_svcs(ns, "s"),
                     {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}})
    assert r.status == 200, r
    assert r.json.get("status", {}).get("loadBalancer", {}) == {}, r.json


def test_put_service_main_resource_ignores_status(server, ns):
    s = server.post(_svcs(ns), svc("s")).json
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}
    r = server.put(_svcs(ns, "s"), s)
    assert r.status == 200, r
    assert r.json.get("status", {}).get("loadBalancer", {}) == {}, r.json


def test_patch_pod_status_changes_status_not_spec(server, ns):
    server.post(_pods(ns), pod("p", node="node-1"))
    r = server.patch(_pods(ns, "p", "status"), {
        "spec": {"activeDeadlineSeconds": 5},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]},
    })
    assert r.status == 200, r
    body = r.json
    assert body["status"]["phase"] == "Running", body
    assert body["status"]["podIP"] == "10.0.0.5"
    assert "activeDeadlineSeconds" not in body["spec"], body["spec"]
    live = server.get(_pods(ns, "p")).json
    assert live["status"]["phase"] == "Running"
    assert "activeDeadlineSeconds" not in live["spec"]


def test_put_pod_status_changes_status_not_spec_nor_owner_references(server, ns):
    created = server.post(_pods(ns), pod("p", node="node-1")).json
    created["spec"]["containers"][0]["image"] = "nginx:9.9"
    created["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap",
                                              "name": "x", "uid": "1234"}]
    created["status"] = {"phase": "Running"}
    r = server.put(_pods(ns, "p", "status"), created)
    assert r.status == 200, r
    assert r.json["status"]["phase"] == "Running", r.json
    assert r.json["spec"]["containers"][0]["image"] == "nginx:1.27"
    assert not r.json["metadata"].get("ownerReferences"), r.json["metadata"]


def test_pod_status_subresource_changes_only_status(server, ns):
    # The API conventions: the status subresource changes the status and nothing else. (The
    # 1.32 Pod status strategy itself lets label changes through; the test server is stricter
    # there, on purpose: a controller that writes labels through /status is a bug on every other
    # kind. README: "Stricter than a real apiserver".)
    server.post(_pods(ns), pod("p", node="node-1"))
    r = server.patch(_pods(ns, "p", "status"), {"metadata": {"labels": {"via": "status"}},
                                                "status": {"message": "m"}})
    assert r.status == 200, r
    assert "via" not in (r.json["metadata"].get("labels") or {}), r.json["metadata"]
    assert r.json["status"]["message"] == "m", r.json["status"]


def test_get_pod_status_subresource_returns_whole_pod(server, ns):
    server.post(_pods(ns), pod("p"))
    r = server.get(_pods(ns, "p", "status"))
    assert r.status == 200, r
    assert r.json["kind"] == "Pod" and r.json["spec"]["containers"], r.json


def test_service_status_subresource_sets_load_balancer(server, ns):
    server.post(_svcs(ns), svc("lb", type="LoadBalancer"))
    r = server.patch(_svcs(ns, "lb", "status"), {
        "spec": {"selector": {"changed": "yes"}},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}})
    assert r.status == 200, r
    assert r.json["status"]["loadBalancer"]["ingress"][0]["ip"] == "192.0.2.10", r.json
    assert r.json["spec"]["selector"] == {"app": "lb"}


def test_configmap_has_no_status_subresource(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("c"))
    for method in ("GET", "PUT", "PATCH"):
        body = None if method == "GET" else cm("c")
        ct = "application/merge-patch+json" if method == "PATCH" else "application/json"
        r = server.request(method, f"/api/v1/namespaces/{ns}/configmaps/c/status", body,
                           content_type=ct)
        assert_status(r, 404, "NotFound")


def test_unknown_subresource_is_404(server, ns):
    server.post(_pods(ns), pod("p"))
    r = server.get(_pods(ns, "p", "frobnicate"))
    assert_status(r, 404, "NotFound")


def test_pod_log_for_pod_on_missing_node_is_404(server, ns):
    node = uniq("ghost")
    server.post(_pods(ns), pod("p", node=node))
    r = server.get(_pods(ns, "p", "log"))
    assert_status(r, 404, "NotFound", f'nodes "{node}" not found')


def test_pod_log_for_missing_pod_is_404(server, ns):
    r = server.get(_pods(ns, "nope", "log"))
    assert_status(r, 404, "NotFound", 'pods "nope" not found')


def test_kubectl_get_and_patch_with_subresource_status(server, ns):
    server.post(_pods(ns), pod("p", node="node-1"))
    got = server.kubectl_json("-n", ns, "get", "pod", "p", "--subresource=status")
    assert got["kind"] == "Pod" and got["status"]["phase"] == "Pending", got
    server.kubectl("-n", ns, "patch", "pod", "p", "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": {"phase": "Running"}}))
    assert server.get(_pods(ns, "p")).json["status"]["phase"] == "Running"
    # without --subresource the same patch changes nothing
    server.kubectl("-n", ns, "patch", "pod", "p", "--type=merge",
                   "-p", json.dumps({"status": {"phase": "Pending"}}))
    assert server.get(_pods(ns, "p")).json["status"]["phase"] == "Running"


def test_deployment_status_subresource(server, ns):
    from conftest import deployment
    server.post(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("d"))
    p = f"/apis/apps/v1/namespaces/{ns}/deployments/d"
    r = server.patch(p, {"status": {"replicas": 7}})
    assert r.status == 200 and r.json.get("status", {}).get("replicas") != 7, r
    r = server.patch(p + "/status", {"spec": {"replicas": 9}, "status": {"replicas": 7}})
    assert r.status == 200, r
    assert r.json["status"]["replicas"] == 7 and r.json["spec"]["replicas"] == 1, r.json


def test_scale_subresource_of_deployment(server, ns):
    from conftest import deployment
    server.post(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("d"))
    r = server.get(f"/apis/apps/v1/namespaces/{ns}/deployments/d/scale")
    assert r.status == 200, r
    assert r.json["kind"] == "Scale" and r.json["apiVersion"] == "autoscaling/v1", r.json
    assert r.json["spec"]["replicas"] == 1
    server.kubectl("-n", ns, "scale", "deployment", "d", "--replicas=3")
    assert server.get(f"/apis/apps/v1/namespaces/{ns}/deployments/d").json["spec"]["replicas"] == 3
