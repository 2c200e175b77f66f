"""Item 6: the OpenAPI documents and what kubectl builds on them (explain, default validation).

`/openapi/v2` is the Swagger 2.0 document (JSON on `Accept: application/json`), `/openapi/v3`
an index of group-versions each pointing at `serverRelativeURL` (with a `hash` query) whose
document is OpenAPI 3.0 with `components.schemas` keyed by the Go type's full name
(`io.k8s.api.core.v1.Service`). kubectl 1.32's `explain` reads v3; its default `--validate=strict`
sends `fieldValidation=Strict` once v3 says the server supports the parameter, so an unknown
field gets the server's `strict decoding error`.
"""

import re

from conftest import uniq, wait_for, write


def _norm(text):
    return re.sub(r"\s+", " ", text)


def test_openapi_v2_json(server):
    r = server.get("/openapi/v2", headers={"Accept": "application/json"})
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    doc = r.json
    assert doc["swagger"] == "2.0"
    assert doc["info"]["title"] == "Kubernetes"
    assert doc["info"]["version"].startswith("v1.32"), doc["info"]
    svc = doc["definitions"]["io.k8s.api.core.v1.Service"]
    assert {"group": "", "kind": "Service", "version": "v1"} in svc["x-kubernetes-group-version-kind"]
    assert "spec" in svc["properties"]
    assert "io.k8s.api.apps.v1.Deployment" in doc["definitions"]
    assert "/api/v1/namespaces/{namespace}/services" in doc["paths"]
    assert "/apis/apps/v1/namespaces/{namespace}/deployments/{name}" in doc["paths"]


def test_openapi_v3_index_and_group_version_documents(server):
    r = server.get("/openapi/v3")
    assert r.status == 200, r
    paths = r.json["paths"]
    for gv in ("api/v1", "apis/apps/v1", "apis/discovery.k8s.io/v1", "apis/coordination.k8s.io/v1"):
        assert gv in paths, sorted(paths)
        assert paths[gv]["serverRelativeURL"].startswith(f"/openapi/v3/{gv}?hash="), paths[gv]
    core = server.get(paths["api/v1"]["serverRelativeURL"])
    assert core.status == 200, core
    doc = core.json
    assert doc["openapi"].startswith("3."), doc.get("openapi")
    schemas = doc["components"]["schemas"]
    svc = schemas["io.k8s.api.core.v1.Service"]
    assert svc["properties"]["spec"]["allOf"][0]["$ref"] == "#/components/schemas/io.k8s.api.core.v1.ServiceSpec", svc["properties"]["spec"]
    ports = schemas["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"]
    assert ports["x-kubernetes-list-type"] == "map"
    assert ports["x-kubernetes-list-map-keys"] == ["port", "protocol"]
    assert ports["x-kubernetes-patch-merge-key"] == "port"
    assert "/api/v1/namespaces/{namespace}/services/{name}" in doc["paths"]
    apps = server.get(paths["apis/apps/v1"]["serverRelativeURL"]).json
    assert "io.k8s.api.apps.v1.Deployment" in apps["components"]["schemas"]


def test_openapi_v3_unknown_group_version_is_404(server):
    r = server.get("/openapi/v3/apis/nope.example.com/v1")
    assert r.status == 404, r


def test_kubectl_explain_service_spec_ports(server):
    p = server.kubectl("explain", "service.spec.ports")
    out = _norm(p.stdout)
    assert "KIND: Service" in out and "VERSION: v1" in out, p.stdout
    assert "FIELD: ports <[]ServicePort>" in out, p.stdout
    assert ("The list of ports that are exposed by this service. More info: "
            "https://kubernetes.io/docs/concepts/services-networking/service/#virtual-ips-and-service-proxies") in out, p.stdout
    assert "targetPort <IntOrString>" in out, p.stdout
    assert "protocol <string>" in out and "port <integer> -required-" in out, p.stdout


def test_kubectl_explain_deployment_spec_replicas(server):
    p = server.kubectl("explain", "deployment.spec.replicas")
    out = _norm(p.stdout)
    assert "GROUP: apps" in out and "KIND: Deployment" in out, p.stdout
    assert "FIELD: replicas <integer>" in out, p.stdout
    assert ("Number of desired pods. This is a pointer to distinguish between explicit zero "
            "and not specified. Defaults to 1.") in out, p.stdout


def test_kubectl_apply_default_validation_refuses_unknown_field(server, ns, tmp):
    f = write(tmp, "svc.yaml", f"""apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {ns}
spec:
  foo: bar
  ports:
  - port: 80
""")
    p = server.kubectl("apply", "-f", f, check=False)
    assert p.returncode != 0, p.stdout
    assert 'Error from server (BadRequest): error when creating "' in p.stderr, p.stderr
    assert ('Service in version "v1" cannot be handled as a Service: strict decoding error: '
            'unknown field "spec.foo"') in p.stderr, p.stderr
    assert server.get(f"/api/v1/namespaces/{ns}/services/web").status == 404


def _crd(group, plural, kind):
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind,
                      "listKind": kind + "List"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "description": f"A {kind} for the conformance suite.",
                    "properties": {"spec": {
                        "type": "object", "description": "The desired state of the gadget.",
                        "properties": {
                            "size": {"type": "integer", "minimum": 1,
                                     "description": "How many parts the gadget has."},
                            "color": {"type": "string", "enum": ["red", "blue"],
                                      "description": "The gadget's colour."},
                        }}}}},
            }],
        },
    }


def test_crd_schema_in_openapi_and_kubectl_explain(server):
    group = f"{uniq('g')}.example.com"
    crd = _crd(group, "gadgets", "Gadget")
    r = server.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert r.status == 201, r
    name = crd["metadata"]["name"]
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in
                         server.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                         .json.get("status", {}).get("conditions", [])), 5, msg="CRD Established")
    wait_for(lambda: f"apis/{group}/v1" in server.get("/openapi/v3").json["paths"], 5,
             msg="the CRD's group-version in /openapi/v3")
    url = server.get("/openapi/v3").json["paths"][f"apis/{group}/v1"]["serverRelativeURL"]
    doc = server.get(url).json
    key = ".".join(reversed(group.split("."))) + ".v1.Gadget"
    assert key in doc["components"]["schemas"], sorted(doc["components"]["schemas"])
    p = server.kubectl("explain", f"gadgets.{group}.spec")
    out = _norm(p.stdout)
    assert "KIND: Gadget" in out and "FIELD: spec <Object>" in out, p.stdout
    assert "The desired state of the gadget." in out, p.stdout
    assert "size <integer>" in out and "color <string>" in out, p.stdout
    server.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
