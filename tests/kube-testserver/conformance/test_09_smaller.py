"""Item 9: /version, field selectors, resourceVersionMatch, watch edge cases (future RV,
sendInitialEvents, bookmark frequency), CRDs and custom resources, server-side apply, and the
protobuf bodies of kubectl's typed `create` commands.
"""

import json

import pytest

from conftest import assert_status, cm, pod, uniq, wait_for, write


# ---------------------------------------------------------------- /version


def test_version_fields(server):
    r = server.get("/version")
    assert r.status == 200, r
    v = r.json
    for k in ("major", "minor", "gitVersion", "gitCommit", "gitTreeState", "buildDate",
              "goVersion", "compiler", "platform"):
        assert v.get(k), f"{k} missing in {v}"
    assert v["major"] == "1" and v["minor"] == "32", v
    assert v["gitVersion"].startswith("v1.32."), v
    assert v["gitTreeState"] in ("clean", "dirty"), v
    assert len(v["gitCommit"]) == 40 and int(v["gitCommit"], 16) >= 0, v
    assert v["buildDate"].endswith("Z") and "T" in v["buildDate"], v
    assert v["compiler"] == "gc" and v["goVersion"].startswith("go1."), v


def test_python_version_api(api_client):
    from kubernetes import client
    info = client.VersionApi(api_client).get_code()
    assert info.major == "1" and info.minor == "32"
    assert info.build_date and info.git_commit and info.git_tree_state


# ---------------------------------------------------------------- field selectors


def _names(resp):
    assert resp.status == 200, resp
    return sorted(i["metadata"]["name"] for i in resp.json["items"])


def test_field_selector_pod_spec_node_name(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("a", node="n1"))
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("b", node="n2"))
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("c"))
    p = f"/api/v1/namespaces/{ns}/pods"
    assert _names(server.get(p, query={"fieldSelector": "spec.nodeName=n1"})) == ["a"]
    assert _names(server.get(p, query={"fieldSelector": "spec.nodeName="})) == ["c"]
    assert _names(server.get(p, query={"fieldSelector": "spec.nodeName!=n1"})) == ["b", "c"]


def test_field_selector_pod_status_phase(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("a", node="n1"))
    server.post(f"/api/v1/namespaces/{ns}/pods", pod("b", node="n1"))
    server.patch(f"/api/v1/namespaces/{ns}/pods/b/status", {"status": {"phase": "Running"}})
    p = f"/api/v1/namespaces/{ns}/pods"
    assert _names(server.get(p, query={"fieldSelector": "status.phase=Running"})) == ["b"]
    assert _names(server.get(p, query={"fieldSelector": "status.phase=Pending"})) == ["a"]


def test_field_selector_secret_type(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "o"}, "stringData": {"a": "b"}})
    server.post(f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "t"}, "type": "example.com/x",
                                                     "stringData": {"a": "b"}})
    p = f"/api/v1/namespaces/{ns}/secrets"
    assert _names(server.get(p, query={"fieldSelector": "type=example.com/x"})) == ["t"]
    assert _names(server.get(p, query={"fieldSelector": "type=Opaque"})) == ["o"]


def test_field_selector_metadata_name_any_kind(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("x"))
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("y"))
    assert _names(server.get(f"/api/v1/namespaces/{ns}/configmaps",
                             query={"fieldSelector": "metadata.name=x"})) == ["x"]
    from conftest import deployment
    server.post(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("d"))
    assert _names(server.get(f"/apis/apps/v1/namespaces/{ns}/deployments",
                             query={"fieldSelector": "metadata.name=d,metadata.namespace=" + ns})) == ["d"]


def test_field_selector_unsupported_label_is_400(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps", query={"fieldSelector": "spec.foo=bar"})
    st = assert_status(r, 400, "BadRequest")
    assert st["message"] == "field label not supported: spec.foo", st


def test_field_selector_unsupported_label_on_watch_is_400(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps",
                   query={"watch": "true", "fieldSelector": "spec.foo=bar", "timeoutSeconds": "1"})
    st = assert_status(r, 400, "BadRequest")
    assert st["message"] == "field label not supported: spec.foo", st


# ---------------------------------------------------------------- resourceVersionMatch


def test_resource_version_match_exact_serves_that_version(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps"
    server.post(p, cm("a", labels={"rv": "t"}))
    rv1 = server.get(p).json["metadata"]["resourceVersion"]
    server.post(p, cm("b", labels={"rv": "t"}))
    server.patch(f"{p}/a", {"data": {"k": "changed"}})
    r = server.get(p, query={"resourceVersion": rv1, "resourceVersionMatch": "Exact",
                             "labelSelector": "rv=t"})
    assert r.status == 200, r
    assert r.json["metadata"]["resourceVersion"] == rv1
    items = {i["metadata"]["name"]: i for i in r.json["items"]}
    assert sorted(items) == ["a"], items
    assert items["a"]["data"] == {"k": "v"}


def test_resource_version_match_not_older_than(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps"
    server.post(p, cm("a", labels={"rv": "t"}))
    rv1 = server.get(p).json["metadata"]["resourceVersion"]
    server.post(p, cm("b", labels={"rv": "t"}))
    r = server.get(p, query={"resourceVersion": rv1, "resourceVersionMatch": "NotOlderThan",
                             "labelSelector": "rv=t"})
    assert r.status == 200, r
    assert int(r.json["metadata"]["resourceVersion"]) >= int(rv1)


def test_resource_version_match_without_resource_version_is_invalid(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps", query={"resourceVersionMatch": "Exact"})
    st = assert_status(r, 422, "Invalid")
    assert st["message"] == ('ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
                             'resourceVersionMatch is forbidden unless resourceVersion is provided'), st


def test_resource_version_match_unsupported_value_is_invalid(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps",
                   query={"resourceVersion": "1", "resourceVersionMatch": "Newest"})
    st = assert_status(r, 422, "Invalid")
    assert 'resourceVersionMatch: Unsupported value: "Newest": supported values: "Exact", "NotOlderThan", ""' in st["message"], st


def test_resource_version_match_exact_zero_is_invalid(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps",
                   query={"resourceVersion": "0", "resourceVersionMatch": "Exact"})
    st = assert_status(r, 422, "Invalid")
    assert 'resourceVersionMatch "exact" is forbidden for resourceVersion "0"' in st["message"], st


def test_resource_version_match_with_continue_is_invalid(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps"
    for n in ("a", "b", "c"):
        server.post(p, cm(n))
    page = server.get(p, query={"limit": "1"}).json
    cont = page["metadata"]["continue"]
    r = server.get(p, query={"resourceVersion": page["metadata"]["resourceVersion"],
                             "resourceVersionMatch": "NotOlderThan", "continue": cont})
    st = assert_status(r, 422, "Invalid")
    assert "resourceVersionMatch is forbidden when continue is provided" in st["message"], st


def test_resource_version_match_on_watch_without_send_initial_events_is_invalid(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps",
                   query={"watch": "true", "resourceVersionMatch": "NotOlderThan",
                          "resourceVersion": "1", "timeoutSeconds": "1"})
    st = assert_status(r, 422, "Invalid")
    assert "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided" in st["message"], st


# ---------------------------------------------------------------- watch edge cases


def test_watch_from_future_resource_version_replays_nothing(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps"
    server.post(p, cm("old"))
    rv = int(server.get(p).json["metadata"]["resourceVersion"])
    future = str(rv + 1_000_000)
    w = server.watch_bg(p, {"resourceVersion": future, "timeoutSeconds": "2"})
    server.post(p, cm("new"))  # its RV is below the watch's: not delivered either
    w.join()
    objs = [e for e in w.events if e["type"] in ("ADDED", "MODIFIED", "DELETED")]
    assert objs == [], w.events
    errors = [e for e in w.events if e["type"] == "ERROR"]
    for e in errors:  # if the server answers at all, it is the cacher's "Too large" error
        assert "Too large resource version" in e["object"].get("message", ""), e


def test_send_initial_events_then_bookmark(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps"
    server.post(p, cm("a"))
    server.post(p, cm("b"))
    ev = server.watch(p, {"sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan",
                          "allowWatchBookmarks": "true", "timeoutSeconds": "2"}, max_seconds=8)
    added = [e["object"]["metadata"]["name"] for e in ev if e["type"] == "ADDED"]
    assert {"a", "b"} <= set(added), ev
    bms = [i for i, e in enumerate(ev) if e["type"] == "BOOKMARK"
           and e["object"]["metadata"].get("annotations", {}).get("k8s.io/initial-events-end") == "true"]
    assert bms, ev
    first_bm = bms[0]
    last_added = max(i for i, e in enumerate(ev) if e["type"] == "ADDED")
    assert last_added < first_bm, ev
    bm = ev[first_bm]["object"]
    assert bm["kind"] == "ConfigMap" and int(bm["metadata"]["resourceVersion"]) > 0, bm


def test_send_initial_events_requires_not_older_than(server, ns):
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps",
                   query={"watch": "true", "sendInitialEvents": "true", "allowWatchBookmarks": "true",
                          "timeoutSeconds": "1"})
    st = assert_status(r, 422, "Invalid")
    assert "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan" in st["message"], st


def test_bookmarks_are_not_sent_every_second(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps"
    server.post(p, cm("a"))
    rv = server.get(p).json["metadata"]["resourceVersion"]
    # the watch cache sends a bookmark about once a minute, and one ~2 s before the deadline
    ev = server.watch(p, {"resourceVersion": rv, "allowWatchBookmarks": "true",
                          "timeoutSeconds": "5"}, max_seconds=12)
    bms = [e for e in ev if e["type"] == "BOOKMARK"]
    assert len(bms) <= 1, ev


# ---------------------------------------------------------------- CRDs and custom resources


def _crd(group, status=False):
    v = {"name": "v1", "served": True, "storage": True,
         "schema": {"openAPIV3Schema": {"type": "object", "properties": {
             "spec": {"type": "object", "properties": {
                 "size": {"type": "integer", "minimum": 1},
                 "color": {"type": "string", "enum": ["red", "blue"]}}},
             "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}}}
    if status:
        v["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"things.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"plural": "things", "singular": "thing", "kind": "Thing"},
                     "versions": [v]}}


@pytest.fixture
def crd(server):
    group = f"{uniq('c')}.example.com"
    r = server.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", _crd(group, status=True))
    assert r.status == 201, r
    name = f"things.{group}"

    def established():
        st = server.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}").json.get("status", {})
        return any(c["type"] == "Established" and c["status"] == "True" for c in st.get("conditions", []))
    wait_for(established, 5, msg="CRD Established")
    yield group
    server.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")


def test_crd_status_stored_versions_and_conditions(server, crd):
    st = server.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/things.{crd}").json["status"]
    assert st["storedVersions"] == ["v1"], st
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds.get("NamesAccepted") == "True" and conds.get("Established") == "True", st
    assert st["acceptedNames"]["kind"] == "Thing" and st["acceptedNames"]["plural"] == "things", st


def test_cr_unknown_fields_pruned(server, ns, crd):
    r = server.post(f"/apis/{crd}/v1/namespaces/{ns}/things",
                    {"apiVersion": f"{crd}/v1", "kind": "Thing", "metadata": {"name": "t"},
                     "spec": {"size": 2, "extra": "dropped"}, "toplevel": 1})
    assert r.status == 201, r
    assert r.json["spec"] == {"size": 2}, r.json
    assert "toplevel" not in r.json
    assert any('unknown field \\"spec.extra\\"' in w for w in r.header_all("Warning")), r.headers
    live = server.get(f"/apis/{crd}/v1/namespaces/{ns}/things/t").json
    assert live["spec"] == {"size": 2}


def test_cr_unknown_field_strict_is_400(server, ns, crd):
    r = server.post(f"/apis/{crd}/v1/namespaces/{ns}/things",
                    {"apiVersion": f"{crd}/v1", "kind": "Thing", "metadata": {"name": "t"},
                     "spec": {"size": 2, "extra": "x"}}, query={"fieldValidation": "Strict"})
    st = assert_status(r, 400, "BadRequest")
    assert 'strict decoding error: unknown field "spec.extra"' in st["message"], st


def test_cr_invalid_values_are_422(server, ns, crd):
    r = server.post(f"/apis/{crd}/v1/namespaces/{ns}/things",
                    {"apiVersion": f"{crd}/v1", "kind": "Thing", "metadata": {"name": "t"},
                     "spec": {"size": 0, "color": "green"}})
    st = assert_status(r, 422, "Invalid")
    assert st["message"].startswith(f'Thing.{crd} "t" is invalid: '), st
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" in st["message"], st
    assert 'spec.color: Unsupported value: "green": supported values: "red", "blue"' in st["message"], st
    r = server.post(f"/apis/{crd}/v1/namespaces/{ns}/things",
                    {"apiVersion": f"{crd}/v1", "kind": "Thing", "metadata": {"name": "t"},
                     "spec": {"size": "big"}})
    st = assert_status(r, 422, "Invalid")
    assert 'spec.size: Invalid value: "string": spec.size in body must be of type integer: "string"' in st["message"], st


def test_cr_strategic_merge_patch_is_415(server, ns, crd):
    server.post(f"/apis/{crd}/v1/namespaces/{ns}/things",
                {"apiVersion": f"{crd}/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": {"size": 1}})
    r = server.patch(f"/apis/{crd}/v1/namespaces/{ns}/things/t", {"spec": {"size": 2}},
                     content_type="application/strategic-merge-patch+json")
    st = assert_status(r, 415, "UnsupportedMediaType")
    assert st["message"] == ("the body of the request was in an unknown format - accepted media types include: "
                             "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"), st


def test_cr_status_subresource(server, ns, crd):
    p = f"/apis/{crd}/v1/namespaces/{ns}/things"
    server.post(p, {"apiVersion": f"{crd}/v1", "kind": "Thing", "metadata": {"name": "t"},
                    "spec": {"size": 1}, "status": {"ready": True}})
    t = server.get(f"{p}/t").json
    assert "status" not in t or t["status"] in ({}, None), "status is dropped on create"
    r = server.patch(f"{p}/t/status", {"spec": {"size": 5}, "status": {"ready": True}})
    assert r.status == 200, r
    assert r.json["status"] == {"ready": True} and r.json["spec"]["size"] == 1, r.json
    r = server.patch(f"{p}/t", {"spec": {"size": 3}, "status": {"ready": False}})
    assert r.json["status"] == {"ready": True} and r.json["spec"]["size"] == 3, r.json
    assert r.json["metadata"]["generation"] == 2, r.json


# ---------------------------------------------------------------- server-side apply

APPLY = "application/apply-patch+yaml"


def _apply_cm(data):
    return json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"},
                       "data": data})


def test_ssa_creates_when_absent_with_managed_fields(server, ns):
    r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/ssa", _apply_cm({"k": "1"}),
                     content_type=APPLY, query={"fieldManager": "alpha"})
    assert r.status == 201, r
    mf = r.json["metadata"]["managedFields"]
    assert len(mf) == 1, mf
    assert mf[0]["manager"] == "alpha" and mf[0]["operation"] == "Apply", mf
    assert mf[0]["apiVersion"] == "v1" and mf[0]["fieldsType"] == "FieldsV1", mf
    assert mf[0]["fieldsV1"] == {"f:data": {"f:k": {}}}, mf
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/ssa").json["data"] == {"k": "1"}


def test_ssa_update_by_same_manager_and_field_removal(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps/ssa"
    server.patch(p, _apply_cm({"k": "1", "gone": "x"}), content_type=APPLY, query={"fieldManager": "alpha"})
    r = server.patch(p, _apply_cm({"k": "2"}), content_type=APPLY, query={"fieldManager": "alpha"})
    assert r.status == 200, r
    assert r.json["data"] == {"k": "2"}, "a field the manager stops applying is removed"


def test_ssa_conflict_with_other_manager_is_409(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps/ssa"
    server.patch(p, _apply_cm({"k": "1"}), content_type=APPLY, query={"fieldManager": "alpha"})
    r = server.patch(p, _apply_cm({"k": "2"}), content_type=APPLY, query={"fieldManager": "beta"})
    st = assert_status(r, 409, "Conflict")
    assert st["message"] == 'Apply failed with 1 conflict: conflict with "alpha": .data.k', st
    assert st["details"]["causes"] == [{"reason": "FieldManagerConflict",
                                        "message": 'conflict with "alpha"', "field": ".data.k"}], st
    assert server.get(p).json["data"] == {"k": "1"}


def test_ssa_force_takes_ownership(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps/ssa"
    server.patch(p, _apply_cm({"k": "1"}), content_type=APPLY, query={"fieldManager": "alpha"})
    r = server.patch(p, _apply_cm({"k": "2"}), content_type=APPLY,
                     query={"fieldManager": "beta", "force": "true"})
    assert r.status == 200, r
    assert r.json["data"] == {"k": "2"}
    owners = {m["manager"]: m for m in r.json["metadata"]["managedFields"]}
    assert owners["beta"]["fieldsV1"] == {"f:data": {"f:k": {}}}, owners
    assert "alpha" not in owners or "f:k" not in json.dumps(owners["alpha"].get("fieldsV1", {})), owners


def test_ssa_shared_value_is_no_conflict(server, ns):
    p = f"/api/v1/namespaces/{ns}/configmaps/ssa"
    server.patch(p, _apply_cm({"k": "1"}), content_type=APPLY, query={"fieldManager": "alpha"})
    r = server.patch(p, _apply_cm({"k": "1"}), content_type=APPLY, query={"fieldManager": "beta"})
    assert r.status == 200, r
    managers = sorted(m["manager"] for m in r.json["metadata"]["managedFields"])
    assert managers == ["alpha", "beta"], managers


def test_ssa_without_field_manager_is_invalid(server, ns):
    r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/ssa", _apply_cm({"k": "1"}), content_type=APPLY)
    st = assert_status(r, 422, "Invalid")
    assert st["message"] == ('PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                             'is required for apply patch'), st


def test_force_on_non_apply_patch_is_invalid(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("c"))
    r = server.patch(f"/api/v1/namespaces/{ns}/configmaps/c", {"data": {"a": "b"}},
                     query={"force": "true"})
    st = assert_status(r, 422, "Invalid")
    assert "force: Forbidden: may not be specified for non-apply patch" in st["message"], st


def test_update_records_update_managed_fields(server, ns):
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("c"), query={"fieldManager": "creator"})
    mf = r.json["metadata"]["managedFields"]
    assert mf[0]["manager"] == "creator" and mf[0]["operation"] == "Update", mf


def test_kubectl_apply_server_side(server, ns, tmp):
    f = write(tmp, "cm.yaml", f"""apiVersion: v1
kind: ConfigMap
metadata:
  name: ssa
  namespace: {ns}
data:
  k: "1"
""")
    p = server.kubectl("apply", "--server-side", "-f", f)
    assert "configmap/ssa serverside-applied" in p.stdout, p.stdout
    live = server.get(f"/api/v1/namespaces/{ns}/configmaps/ssa").json
    mf = live["metadata"]["managedFields"]
    assert [(m["manager"], m["operation"]) for m in mf] == [("kubectl", "Apply")], mf
    # another manager's conflicting apply fails, --force-conflicts wins
    f2 = write(tmp, "cm2.yaml", open(f).read().replace('k: "1"', 'k: "2"'))
    p = server.kubectl("apply", "--server-side", "--field-manager=other", "-f", f2, check=False)
    assert p.returncode != 0 and "conflict" in p.stderr.lower(), p.stderr
    server.kubectl("apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", f2)
    assert server.get(f"/api/v1/namespaces/{ns}/configmaps/ssa").json["data"] == {"k": "2"}


# ---------------------------------------------------------------- protobuf (kubectl create)


def test_kubectl_create_service_clusterip(server, ns):
    server.kubectl("-n", ns, "create", "service", "clusterip", "web", "--tcp=80:8080")
    s = server.get(f"/api/v1/namespaces/{ns}/services/web").json
    assert s["spec"]["type"] == "ClusterIP"
    assert s["spec"]["ports"][0]["port"] == 80 and s["spec"]["ports"][0]["targetPort"] == 8080, s
    assert s["spec"]["ports"][0]["name"] == "80-8080" and s["spec"]["selector"] == {"app": "web"}, s


def test_kubectl_create_deployment(server, ns):
    server.kubectl("-n", ns, "create", "deployment", "web", "--image=nginx:1.27", "--replicas=2")
    d = server.get(f"/apis/apps/v1/namespaces/{ns}/deployments/web").json
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"
    assert d["spec"]["selector"] == {"matchLabels": {"app": "web"}}


def test_kubectl_create_serviceaccount(server, ns):
    server.kubectl("-n", ns, "create", "serviceaccount", "robot")
    assert server.get(f"/api/v1/namespaces/{ns}/serviceaccounts/robot").status == 200


def test_kubectl_create_job(server, ns):
    server.kubectl("-n", ns, "create", "job", "once", "--image=busybox:1.36", "--", "true")
    j = server.get(f"/apis/batch/v1/namespaces/{ns}/jobs/once").json
    c = j["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "busybox:1.36" and c["command"] == ["true"], c
    assert j["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_protobuf_only_accept_is_refused_not_mislabelled(server, ns):
    # The server decodes protobuf bodies but answers in JSON (README: what it does not do). A
    # client that accepts protobuf only must be told so (406), never handed JSON; kubectl and
    # client-go accept both and get JSON.
    server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("pb"))
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps/pb",
                   headers={"Accept": "application/vnd.kubernetes.protobuf"})
    assert_status(r, 406, "NotAcceptable")
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps/pb",
                   headers={"Accept": "application/vnd.kubernetes.protobuf, application/json"})
    assert r.status == 200 and r.headers.get("content-type") == "application/json", r
