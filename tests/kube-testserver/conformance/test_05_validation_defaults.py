"""Item 5: validation, field validation and defaulting.

Decoding errors (wrong JSON type, bad base64, unknown fields under `fieldValidation=Strict`) are
400 BadRequest `<Kind> in version "v1" cannot be handled as a <Kind>: ...`; validation errors are
422 Invalid `<Kind> "<name>" is invalid: <field>: <error>`. Unknown fields are dropped with a
`Warning: 299 - "unknown field \"spec.foo\""` header by default (`Warn`), silently with `Ignore`.
Defaulting follows the v1 defaulters (SetDefaults_*) plus admission (ServiceAccount,
DefaultTolerationSeconds) and the strategies' PrepareForCreate (Pod qosClass, phase Pending).
"""

import base64

import pytest

from conftest import assert_status, cm, deployment, pod, svc, uniq, wait_for, write


def _pods(ns, name=""):
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


def _svcs(ns, name=""):
    return f"/api/v1/namespaces/{ns}/services" + (f"/{name}" if name else "")


# ---------------------------------------------------------------- refused objects


def test_pod_without_containers_is_422(server, ns):
    p = pod("empty")
    p["spec"]["containers"] = []
    r = server.post(_pods(ns), p)
    st = assert_status(r, 422, "Invalid")
    assert st["message"].startswith('Pod "empty" is invalid: '), st
    assert "spec.containers: Required value" in st["message"], st
    assert st["details"]["name"] == "empty" and st["details"]["kind"] == "Pod", st
    assert {"reason": "FieldValueRequired", "message": "Required value",
            "field": "spec.containers"} in st["details"]["causes"], st


def test_clusterip_service_without_ports_is_422(server, ns):
    s = svc("noports")
    del s["spec"]["ports"]
    r = server.post(_svcs(ns), s)
    st = assert_status(r, 422, "Invalid")
    assert 'Service "noports" is invalid: spec.ports: Required value' in st["message"], st


def test_headless_service_without_ports_is_allowed(server, ns):
    s = svc("headless", clusterIP="None")
    del s["spec"]["ports"]
    r = server.post(_svcs(ns), s)
    assert r.status == 201, r
    assert r.json["spec"]["clusterIP"] == "None"


def test_endpointslice_without_address_type_is_422(server, ns):
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "es"}, "endpoints": [{"addresses": ["10.0.0.1"]}]}
    r = server.post(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", es)
    st = assert_status(r, 422, "Invalid")
    assert st["message"].startswith('EndpointSlice.discovery.k8s.io "es" is invalid: '), st
    assert "addressType: Required value" in st["message"], st


def test_secret_with_invalid_base64_is_400(server, ns):
    s = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad"},
         "data": {"k": "not base64!!"}}
    r = server.post(f"/api/v1/namespaces/{ns}/secrets", s)
    st = assert_status(r, 400, "BadRequest")
    assert 'Secret in version "v1" cannot be handled as a Secret' in st["message"], st
    assert "illegal base64 data at input byte" in st["message"], st


def test_changing_cluster_ip_is_422(server, ns):
    s = server.post(_svcs(ns), svc("s")).json
    ip = s["spec"]["clusterIP"]
    octets = ip.split(".")
    octets[-1] = str((int(octets[-1]) + 7) % 250 + 2)
    new_ip = ".".join(octets)
    s["spec"]["clusterIP"] = new_ip
    s["spec"]["clusterIPs"] = [new_ip]
    r = server.put(_svcs(ns, "s"), s)
    st = assert_status(r, 422, "Invalid")
    assert "spec.clusterIP" in st["message"], st
    assert "may not change once set" in st["message"] or "field is immutable" in st["message"], st
    assert server.get(_svcs(ns, "s")).json["spec"]["clusterIP"] == ip


def test_pod_spec_change_other_than_image_is_422(server, ns):
    p = server.post(_pods(ns), pod("p")).json
    r = server.patch(_pods(ns, "p"), {"spec": {"restartPolicy": "Never"}})
    st = assert_status(r, 422, "Invalid")
    assert st["message"].startswith('Pod "p" is invalid: spec: Forbidden: pod updates may not change fields other than'), st
    assert p["spec"]["restartPolicy"] == server.get(_pods(ns, "p")).json["spec"]["restartPolicy"]


def test_pod_image_change_is_allowed(server, ns):
    server.post(_pods(ns), pod("p"))
    r = server.patch(_pods(ns, "p"), {"spec": {"containers": [{"name": "c", "image": "nginx:1.28"}]}},
                     content_type="application/strategic-merge-patch+json")
    assert r.status == 200, r
    assert r.json["spec"]["containers"][0]["image"] == "nginx:1.28"


def test_immutable_configmap_data_change_is_422(server, ns):
    c = cm("imm", {"k": "1"})
    c["immutable"] = True
    server.post(f"/api/v1/namespaces/{ns}/configmaps", c)
    r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/imm", {"data": {"k": "2"}})
    st = assert_status(r, 422, "Invalid")
    assert "data: Forbidden: field is immutable when `immutable` is set" in st["message"], st
    r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/imm", {"immutable": False})
    st = assert_status(r, 422, "Invalid")
    assert "immutable: Forbidden: field is immutable when `immutable` is set" in st["message"], st


def test_wrong_field_type_is_400(server, ns):
    d = deployment("d")
    d["spec"]["replicas"] = "three"
    r = server.post(f"/apis/apps/v1/namespaces/{ns}/deployments", d)
    st = assert_status(r, 400, "BadRequest")
    assert 'Deployment in version "v1" cannot be handled as a Deployment' in st["message"], st
    assert "spec.replicas" in st["message"], st


def test_invalid_name_is_422(server, ns):
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("Not_Valid"))
    st = assert_status(r, 422, "Invalid")
    assert 'ConfigMap "Not_Valid" is invalid: metadata.name: Invalid value: "Not_Valid"' in st["message"], st


# ---------------------------------------------------------------- fieldValidation


def _svc_with_unknown(name):
    s = svc(name)
    s["spec"]["foo"] = "bar"
    return s


def test_field_validation_strict_unknown_field_is_400(server, ns):
    r = server.post(_svcs(ns), _svc_with_unknown("s"), query={"fieldValidation": "Strict"})
    st = assert_status(r, 400, "BadRequest")
    assert st["message"] == ('Service in version "v1" cannot be handled as a Service: '
                             'strict decoding error: unknown field "spec.foo"'), st
    assert server.get(_svcs(ns, "s")).status == 404


def test_field_validation_default_warns_and_drops(server, ns):
    r = server.post(_svcs(ns), _svc_with_unknown("s"))
    assert r.status == 201, r
    warnings = r.header_all("Warning")
    assert any('unknown field \\"spec.foo\\"' in w or 'unknown field "spec.foo"' in w
               for w in warnings), warnings
    assert all(w.startswith("299 - ") for w in warnings), warnings
    assert "foo" not in r.json["spec"]
    assert "foo" not in server.get(_svcs(ns, "s")).json["spec"]


def test_field_validation_warn_explicit(server, ns):
    r = server.post(_svcs(ns), _svc_with_unknown("s"), query={"fieldValidation": "Warn"})
    assert r.status == 201, r
    assert any("spec.foo" in w for w in r.header_all("Warning")), r.headers


def test_field_validation_ignore_drops_silently(server, ns):
    r = server.post(_svcs(ns), _svc_with_unknown("s"), query={"fieldValidation": "Ignore"})
    assert r.status == 201, r
    assert not any("spec.foo" in w for w in r.header_all("Warning")), r.headers
    assert "foo" not in r.json["spec"]


def test_field_validation_strict_on_patch(server, ns):
    server.post(_svcs(ns), svc("s"))
    r = server.patch(_svcs(ns, "s"), {"spec": {"foo": "bar"}}, query={"fieldValidation": "Strict"})
    st = assert_status(r, 400, "BadRequest")
    assert 'strict decoding error: unknown field "spec.foo"' in st["message"], st


def test_field_validation_unsupported_value_is_422(server, ns):
    r = server.post(_svcs(ns), svc("s"), query={"fieldValidation": "Loud"})
    st = assert_status(r, 422, "Invalid")
    assert "fieldValidation" in st["message"], st


# ---------------------------------------------------------------- Secret stringData


def test_secret_string_data_folded_into_data(server, ns):
    s = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
         "data": {"a": base64.b64encode(b"from-data").decode(),
                  "b": base64.b64encode(b"overridden").decode()},
         "stringData": {"b": "from-stringData", "c": "plain"}}
    r = server.post(f"/api/v1/namespaces/{ns}/secrets", s)
    assert r.status == 201, r
    for body in (r.json, server.get(f"/api/v1/namespaces/{ns}/secrets/s").json):
        assert "stringData" not in body, body
        dec = {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
        assert dec == {"a": "from-data", "b": "from-stringData", "c": "plain"}, dec
        assert body["type"] == "Opaque"


# ---------------------------------------------------------------- defaults


def test_service_defaults(server, ns):
    r = server.post(_svcs(ns), svc("s"))
    assert r.status == 201, r
    spec = r.json["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["sessionAffinity"] == "None"
    assert spec["ports"] == [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}], spec
    assert spec["ipFamilies"] == ["IPv4"]
    assert spec["ipFamilyPolicy"] == "SingleStack"
    assert spec["internalTrafficPolicy"] == "Cluster"
    ip = spec["clusterIP"]
    assert ip and ip != "None" and len(ip.split(".")) == 4, spec
    assert spec["clusterIPs"] == [ip]
    assert r.json["status"] == {"loadBalancer": {}}, r.json


def test_service_node_port_defaults(server, ns):
    r = server.post(_svcs(ns), svc("np", type="NodePort"))
    assert r.status == 201, r
    spec = r.json["spec"]
    assert 30000 <= spec["ports"][0]["nodePort"] <= 32767, spec
    assert spec["externalTrafficPolicy"] == "Cluster"


def test_pod_defaults(server, ns):
    r = server.post(_pods(ns), pod("p"))
    assert r.status == 201, r
    spec = r.json["spec"]
    assert spec["restartPolicy"] == "Always"
    assert spec["dnsPolicy"] == "ClusterFirst"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["schedulerName"] == "default-scheduler"
    assert spec["serviceAccountName"] == "default"
    assert spec["securityContext"] == {}
    assert spec["enableServiceLinks"] is True
    assert spec["priority"] == 0
    assert spec["preemptionPolicy"] == "PreemptLowerPriority"
    tol = {t["key"]: t for t in spec.get("tolerations", [])}
    assert tol.get("node.kubernetes.io/not-ready", {}).get("tolerationSeconds") == 300, spec
    assert tol.get("node.kubernetes.io/unreachable", {}).get("effect") == "NoExecute", spec
    c = spec["containers"][0]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "File"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"] == {}
    assert r.json["status"]["phase"] == "Pending"
    assert r.json["status"]["qosClass"] == "BestEffort"


@pytest.mark.parametrize("image,policy", [("nginx:1.27", "IfNotPresent"), ("nginx:latest", "Always"),
                                          ("nginx", "Always"),
                                          ("nginx@sha256:" + "a" * 64, "IfNotPresent")])
def test_pod_image_pull_policy_default(server, ns, image, policy):
    r = server.post(_pods(ns), pod(uniq("p"), image=image))
    assert r.status == 201, r
    assert r.json["spec"]["containers"][0]["imagePullPolicy"] == policy


def test_pod_qos_class_guaranteed(server, ns):
    p = pod("q")
    p["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "100m", "memory": "64Mi"}}
    r = server.post(_pods(ns), p)
    assert r.status == 201, r
    assert r.json["status"]["qosClass"] == "Guaranteed"
    # requests are defaulted from limits
    assert r.json["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "100m", "memory": "64Mi"}


def test_deployment_defaults(server, ns):
    r = server.post(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("d"))
    assert r.status == 201, r
    spec = r.json["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}, spec
    assert spec["revisionHistoryLimit"] == 10
    assert spec["progressDeadlineSeconds"] == 600
    tspec = spec["template"]["spec"]
    assert tspec["restartPolicy"] == "Always" and tspec["dnsPolicy"] == "ClusterFirst"
    assert tspec["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert r.json["metadata"]["generation"] == 1


def test_namespace_defaults(server):
    name = uniq("nsdef")
    r = server.post("/api/v1/namespaces", {"metadata": {"name": name}})
    assert r.status == 201, r
    body = r.json
    assert body["metadata"]["labels"] == {"kubernetes.io/metadata.name": name}, body
    assert body["spec"] == {"finalizers": ["kubernetes"]}, body
    assert body["status"] == {"phase": "Active"}, body
    server.delete(f"/api/v1/namespaces/{name}")


def test_new_namespace_gets_default_serviceaccount_and_root_ca(server, ns):
    wait_for(lambda: server.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default").status == 200,
             5, msg="ServiceAccount default created by the serviceaccount controller")
    wait_for(lambda: server.get(f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt").status == 200,
             5, msg="ConfigMap kube-root-ca.crt published")
    ca = server.get(f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt").json
    assert "-----BEGIN CERTIFICATE-----" in ca["data"]["ca.crt"]


def test_kubectl_apply_with_default_validation(server, ns, tmp):
    f = write(tmp, "svc.yaml", f"""apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {ns}
spec:
  selector: {{app: web}}
  ports:
  - port: 80
    targetPort: 8080
""")
    p = server.kubectl("apply", "-f", f)
    assert "service/web created" in p.stdout, p.stdout
    live = server.get(_svcs(ns, "web")).json
    assert live["spec"]["ports"][0]["targetPort"] == 8080
    p = server.kubectl("apply", "-f", f)
    assert "service/web unchanged" in p.stdout, p.stdout
