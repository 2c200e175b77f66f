"""Item 8: `kubectl get` tables (server-side printing: `Accept: application/json;as=Table`).

The column sets are the apiserver's printers (pkg/printers/internalversion) for the kinds,
`additionalPrinterColumns` for a CRD, plus what kubectl adds (`-o wide`'s priority-1 columns).
"""

import re

from conftest import cm, pod, svc, uniq, wait_for


def _rows(out):
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[0], lines[1:]


def _cols(header):
    return re.split(r"\s{2,}", header.strip())


def _row(rows, name):
    for r in rows:
        cells = re.split(r"\s{2,}", r.strip())
        if cells[0] == name:
            return cells
    raise AssertionError(f"{name} not in {rows}")


def test_services_table(server, ns):
    s = server.post(f"/api/v1/namespaces/{ns}/services", svc("web")).json
    out = server.kubectl("-n", ns, "get", "services").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"], out
    cells = _row(rows, "web")
    assert cells[1:5] == ["ClusterIP", s["spec"]["clusterIP"], "<none>", "80/TCP"], out
    assert re.fullmatch(r"\d+s", cells[5]), out


def test_services_table_nodeport_and_wide(server, ns):
    s = server.post(f"/api/v1/namespaces/{ns}/services", svc("np", type="NodePort")).json
    node_port = s["spec"]["ports"][0]["nodePort"]
    out = server.kubectl("-n", ns, "get", "services", "-o", "wide").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE",
                             "SELECTOR"], out
    cells = _row(rows, "np")
    assert cells[1] == "NodePort" and cells[4] == f"80:{node_port}/TCP", out
    assert cells[6] == "app=np", out


def test_pods_wide_table(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("p", node="node-1"))
    out = server.kubectl("-n", ns, "get", "pods", "-o", "wide").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                             "NOMINATED NODE", "READINESS GATES"], out
    cells = _row(rows, "p")
    assert cells[1:4] == ["0/1", "Pending", "0"], out
    assert cells[5:] == ["<none>", "node-1", "<none>", "<none>"], out


def test_pods_table(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("p"))
    out = server.kubectl("-n", ns, "get", "pods").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"], out
    assert _row(rows, "p")[1:4] == ["0/1", "Pending", "0"], out


def test_endpointslices_table(server, ns):
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
          "addressType": "IPv4",
          "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": ["10.1.0.5"]}, {"addresses": ["10.1.0.6"]}]}
    assert server.post(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", es).status == 201
    out = server.kubectl("-n", ns, "get", "endpointslices").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], out
    assert _row(rows, "web-abc")[1:4] == ["IPv4", "8080", "10.1.0.5,10.1.0.6"], out


def test_nodes_table(server):
    n = uniq("node")
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n, "labels": {"node-role.kubernetes.io/control-plane": ""}}}
    assert server.post("/api/v1/nodes", node).status == 201
    server.patch(f"/api/v1/nodes/{n}/status", {"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "ok", "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                        "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        "nodeInfo": {"kubeletVersion": "v1.32.0", "machineID": "", "systemUUID": "",
                     "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}})
    out = server.kubectl("get", "nodes").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"], out
    cells = _row(rows, n)
    assert cells[1] == "Ready" and cells[2] == "control-plane" and cells[4] == "v1.32.0", out
    server.delete(f"/api/v1/nodes/{n}")


def test_deployments_table(server, ns):
    from conftest import deployment
    server.post(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("d", replicas=2))
    out = server.kubectl("-n", ns, "get", "deployments").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"], out
    cells = _row(rows, "d")
    assert cells[1].endswith("/2"), out


def test_daemonsets_table(server, ns):
    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
          "spec": {"selector": {"matchLabels": {"app": "ds"}},
                   "template": {"metadata": {"labels": {"app": "ds"}},
                                "spec": {"nodeSelector": {"kubernetes.io/os": "linux"},
                                         "containers": [{"name": "c", "image": "nginx:1.27"}]}}}}
    assert server.post(f"/apis/apps/v1/namespaces/{ns}/daemonsets", ds).status == 201
    out = server.kubectl("-n", ns, "get", "daemonsets").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE",
                             "NODE SELECTOR", "AGE"], out
    assert _row(rows, "ds")[6] == "kubernetes.io/os=linux", out


def test_leases_table(server, ns):
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"},
             "spec": {"holderIdentity": "replica-1", "leaseDurationSeconds": 15}}
    assert server.post(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", lease).status == 201
    out = server.kubectl("-n", ns, "get", "leases").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "HOLDER", "AGE"], out
    assert _row(rows, "l")[1] == "replica-1", out


def test_configmaps_table(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("c", {"a": "1", "b": "2"}))
    out = server.kubectl("-n", ns, "get", "configmaps", "c").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "DATA", "AGE"], out
    assert _row(rows, "c")[1] == "2", out


def test_crd_additional_printer_columns(server, ns):
    group = f"{uniq('p')}.example.com"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{
                     "name": "v1", "served": True, "storage": True,
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                         "spec": {"type": "object", "properties": {
                             "size": {"type": "integer"}, "color": {"type": "string"}}}}}},
                     "additionalPrinterColumns": [
                         {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                         {"name": "Color", "type": "string", "jsonPath": ".spec.color"},
                         {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                 }]}}
    assert server.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd).status == 201
    path = f"/apis/{group}/v1/namespaces/{ns}/widgets"
    wait_for(lambda: server.get(path).status == 200, 5, msg="CR endpoint served")
    r = server.post(path, {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                           "spec": {"size": 3, "color": "red"}})
    assert r.status == 201, r
    out = server.kubectl("-n", ns, "get", f"widgets.{group}").stdout
    header, rows = _rows(out)
    assert _cols(header) == ["NAME", "SIZE", "COLOR", "AGE"], out
    assert _row(rows, "w1")[1:3] == ["3", "red"], out
    server.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{group}")


def test_sort_by_name_and_node_name(server, ns):
    for name, node in (("b", "node-a"), ("c", "node-c"), ("a", "node-b")):
        server.post(f"/api/v1/namespaces/{ns}/pods", pod(name, node=node))
    out = server.kubectl("-n", ns, "get", "pods", "--sort-by=.metadata.name").stdout
    _, rows = _rows(out)
    assert [r.split()[0] for r in rows] == ["a", "b", "c"], out
    out = server.kubectl("-n", ns, "get", "pods", "--sort-by=.spec.nodeName").stdout
    _, rows = _rows(out)
    assert [r.split()[0] for r in rows] == ["b", "a", "c"], out


def test_table_as_json_from_server(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("c"))
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps",
                   headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    assert r.status == 200, r
    t = r.json
    assert t["kind"] == "Table" and t["apiVersion"] == "meta.k8s.io/v1", t
    names = [c["name"] for c in t["columnDefinitions"]]
    assert names == ["Name", "Data", "Age"], names
    row = next(rw for rw in t["rows"] if rw["cells"][0] == "c")
    assert row["cells"][1] == 1
    assert row["object"]["kind"] == "PartialObjectMetadata", row["object"]
