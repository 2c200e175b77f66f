"""Item 2: `dryRun=All`.

A dry-run request goes through decoding, defaulting, admission and validation and answers with
the object as it would be stored, but storage is skipped: nothing is persisted, no watch event,
the resourceVersion does not move. A dry-run create fills the generated fields (uid,
creationTimestamp, a generateName'd name) since `BeforeCreate` runs; it has no resourceVersion
(only storage assigns one). `dryRun` accepts only `All`: anything else fails validation of the
options (`CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value`), which the
apiserver reports as 422 Invalid.
"""

import json

import pytest

from conftest import ROOT_CA, assert_status, cm, pod, uniq, write

DRY = {"dryRun": "All"}


def _list_rv(server, ns):
    return server.get(f"/api/v1/namespaces/{ns}/configmaps").json["metadata"]["resourceVersion"]


def _no_events_since(server, ns, rv):
    ev = server.watch(f"/api/v1/namespaces/{ns}/configmaps",
                      {"resourceVersion": rv, "timeoutSeconds": "1"}, max_seconds=6)
    # (kube-root-ca.crt is the root-ca-cert-publisher's, not the test's)
    return [e for e in ev if e["type"] != "BOOKMARK" and e["object"]["metadata"].get("name") != ROOT_CA]


def test_create_dry_run_returns_object_with_generated_fields_and_stores_nothing(server, ns):
    rv = _list_rv(server, ns)
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("dry"), query=DRY)
    assert r.status == 201, r
    body = r.json
    assert body["metadata"]["name"] == "dry"
    assert body["metadata"].get("uid"), body
    assert body["metadata"].get("creationTimestamp"), body
    assert body["data"] == {"k": "v"}
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/dry").status == 404
    assert _no_events_since(server, ns, rv) == []


def test_create_dry_run_generate_name_is_resolved(server, ns):
    obj = cm("")
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "gen-"
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", obj, query=DRY)
    assert r.status == 201, r
    name = r.json["metadata"]["name"]
    assert name.startswith("gen-") and len(name) > len("gen-"), r.json
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/{name}").status == 404


def test_create_dry_run_of_existing_name_is_409(server, ns):
    assert server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("x")).status == 201
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("x"), query=DRY)
    assert_status(r, 409, "AlreadyExists")


def test_update_dry_run_returns_would_be_object_nothing_changes(server, ns):
    created = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("u", {"k": "1"})).json
    rv0 = created["metadata"]["resourceVersion"]
    list_rv = _list_rv(server, ns)
    created["data"] = {"k": "2"}
    r = server.put(f"/api/v1/namespaces/{ns}/configmaps/u", created, query=DRY)
    assert r.status == 200, r
    assert r.json["data"] == {"k": "2"}
    live = server.get(f"/api/v1/namespaces/{ns}/configmaps/u").json
    assert live["data"] == {"k": "1"}
    assert live["metadata"]["resourceVersion"] == rv0
    assert _list_rv(server, ns) == list_rv
    assert _no_events_since(server, ns, list_rv) == []


def test_patch_dry_run_returns_patched_object_nothing_changes(server, ns):
    created = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("p", {"k": "1"})).json
    rv0 = created["metadata"]["resourceVersion"]
    list_rv = _list_rv(server, ns)
    r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/p", {"data": {"k": "2"}}, query=DRY)
    assert r.status == 200, r
    assert r.json["data"] == {"k": "2"}
    live = server.get(f"/api/v1/namespaces/{ns}/configmaps/p").json
    assert live["data"] == {"k": "1"} and live["metadata"]["resourceVersion"] == rv0
    assert _no_events_since(server, ns, list_rv) == []


def test_delete_dry_run_keeps_object(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("d"))
    list_rv = _list_rv(server, ns)
    r = server.delete(f"/api/v1/namespaces/{ns}/configmaps/d", query=DRY)
    assert r.status == 200, r
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/d").status == 200
    assert _no_events_since(server, ns, list_rv) == []


def test_deletecollection_dry_run_keeps_objects(server, ns):
    for n in ("c1", "c2"):
        server.post(f"/api/v1/namespaces/{ns}/configmaps", cm(n, labels={"set": "dc"}))
    list_rv = _list_rv(server, ns)
    r = server.delete(f"/api/v1/namespaces/{ns}/configmaps",
                      query={**DRY, "labelSelector": "set=dc"})
    assert r.status == 200, r
    body = r.json
    assert body["kind"] == "ConfigMapList", body
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["c1", "c2"]
    names = [i["metadata"]["name"] for i in
             server.get(f"/api/v1/namespaces/{ns}/configmaps",
                        query={"labelSelector": "set=dc"}).json["items"]]
    assert sorted(names) == ["c1", "c2"]
    assert _no_events_since(server, ns, list_rv) == []


def test_dry_run_still_validates(server, ns):
    bad = pod("nocontainers")
    bad["spec"]["containers"] = []
    r = server.post(f"/api/v1/namespaces/{ns}/pods", bad, query=DRY)
    assert_status(r, 422, "Invalid", "spec.containers: Required value")


@pytest.mark.parametrize("verb", ["create", "patch", "delete"])
def test_dry_run_unsupported_value_is_rejected(server, ns, verb):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("o"))
    q = {"dryRun": "Foo"}
    if verb == "create":
        r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("n"), query=q)
        kind = "CreateOptions"
    elif verb == "patch":
        r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/o", {"data": {"a": "b"}}, query=q)
        kind = "PatchOptions"
    else:
        r = server.delete(f"/api/v1/namespaces/{ns}/configmaps/o", query=q)
        kind = "DeleteOptions"
    st = assert_status(r, 422, "Invalid")
    assert f'{kind}.meta.k8s.io "" is invalid: dryRun: Unsupported value' in st["message"], st
    assert 'supported values: "All"' in st["message"], st
    # nothing happened
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/o").json["data"] == {"k": "v"}
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/n").status == 404


CM_YAML = """apiVersion: v1
kind: ConfigMap
metadata:
  name: web
  namespace: {ns}
data:
  k: "{v}"
"""


def test_kubectl_apply_dry_run_server_changes_nothing(server, ns, tmp):
    f1 = write(tmp, "v1.yaml", CM_YAML.format(ns=ns, v="1"))
    server.kubectl("apply", "-f", f1)
    before = server.get(f"/api/v1/namespaces/{ns}/configmaps/web").json
    f2 = write(tmp, "v2.yaml", CM_YAML.format(ns=ns, v="2"))
    p = server.kubectl("apply", "--dry-run=server", "-f", f2, "-o", "json")
    assert json.loads(p.stdout)["data"] == {"k": "2"}, p.stdout
    after = server.get(f"/api/v1/namespaces/{ns}/configmaps/web").json
    assert after["data"] == {"k": "1"}
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_kubectl_apply_dry_run_server_of_new_object_creates_nothing(server, ns, tmp):
    f = write(tmp, "new.yaml", CM_YAML.format(ns=ns, v="1"))
    p = server.kubectl("apply", "--dry-run=server", "-f", f)
    assert "created (server dry run)" in p.stdout, p.stdout
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/web").status == 404


def test_kubectl_diff_exit_codes_and_no_change(server, ns, tmp):
    f1 = write(tmp, "v1.yaml", CM_YAML.format(ns=ns, v="1"))
    server.kubectl("apply", "-f", f1)
    before = server.get(f"/api/v1/namespaces/{ns}/configmaps/web").json
    same = server.kubectl("diff", "-f", f1, check=False)
    assert same.returncode == 0, f"{same.returncode}: {same.stderr}{same.stdout}"
    f2 = write(tmp, "v2.yaml", CM_YAML.format(ns=ns, v="2"))
    diff = server.kubectl("diff", "-f", f2, check=False)
    assert diff.returncode == 1, f"{diff.returncode}: {diff.stderr}{diff.stdout}"
    assert '-  k: "1"' in diff.stdout and '+  k: "2"' in diff.stdout, diff.stdout
    after = server.get(f"/api/v1/namespaces/{ns}/configmaps/web").json
    assert after["data"] == {"k": "1"}
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_kubectl_diff_new_object_exit_1(server, ns, tmp):
    f = write(tmp, "new.yaml", CM_YAML.format(ns=ns, v="1").replace("name: web", f"name: {uniq('n')}"))
    d = server.kubectl("diff", "-f", f, check=False)
    assert d.returncode == 1, f"{d.returncode}: {d.stderr}{d.stdout}"
    assert [i for i in server.get(f"/api/v1/namespaces/{ns}/configmaps").json["items"]
            if i["metadata"]["name"] != ROOT_CA] == []
