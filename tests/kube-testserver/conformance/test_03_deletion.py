"""Item 3: deletion — finalizers, graceful pod deletion, namespace termination, garbage
collection propagation policies, preconditions, DELETE response bodies, deletecollection.

What a cluster's controllers do (namespace controller, garbage collector, the kubelet finishing
a graceful pod deletion) is part of what a stand-in cluster has to emulate, so the waits below
are for those controllers' results, each with a deadline.
"""

from conftest import assert_status, cm, pod, status_of, uniq, wait_for

FIN = "example.com/block"


def _cm_path(ns, name=""):
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")


def _list_rv(server, path):
    return server.get(path).json["metadata"]["resourceVersion"]


# ---------------------------------------------------------------- finalizers


def test_delete_with_finalizer_sets_deletion_timestamp_and_keeps_object(server, ns):
    server.post(_cm_path(ns), cm("f", finalizers=[FIN]))
    rv = _list_rv(server, _cm_path(ns))
    w = server.watch_bg(_cm_path(ns), {"resourceVersion": rv, "timeoutSeconds": "3"})
    r = server.delete(_cm_path(ns, "f"))
    assert r.status in (200, 202), r
    body = r.json
    # Not deleted yet: the object itself comes back, with its deletionTimestamp.
    assert body["kind"] == "ConfigMap", body
    assert body["metadata"].get("deletionTimestamp"), body
    assert body["metadata"].get("deletionGracePeriodSeconds") == 0, body
    live = server.get(_cm_path(ns, "f"))
    assert live.status == 200
    assert live.json["metadata"]["deletionTimestamp"]
    assert live.json["metadata"]["finalizers"] == [FIN]
    ev = w.wait_for(lambda e: any(x["type"] == "MODIFIED" for x in e), 3)
    assert not any(x["type"] == "DELETED" for x in ev), ev
    w.close()


def test_removing_last_finalizer_deletes_object_with_deleted_event(server, ns):
    server.post(_cm_path(ns), cm("f", finalizers=[FIN]))
    server.delete(_cm_path(ns, "f"))
    rv = server.get(_cm_path(ns, "f")).json["metadata"]["resourceVersion"]
    w = server.watch_bg(_cm_path(ns), {"resourceVersion": rv, "timeoutSeconds": "3"})
    r = server.patch(_cm_path(ns, "f"), [{"op": "remove", "path": "/metadata/finalizers"}],
                     content_type="application/json-patch+json")
    assert r.status == 200, r
    wait_for(lambda: server.get(_cm_path(ns, "f")).status == 404, 5, msg="object gone")
    w.wait_for(lambda e: any(x["type"] == "DELETED" for x in e), 3)
    w.close()


def test_adding_finalizer_to_terminating_object_is_forbidden(server, ns):
    server.post(_cm_path(ns), cm("f", finalizers=[FIN]))
    server.delete(_cm_path(ns, "f"))
    r = server.patch(_cm_path(ns, "f"), {"metadata": {"finalizers": [FIN, "example.com/new"]}})
    st = assert_status(r, 422, "Invalid")
    assert "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted" in st["message"], st


def test_deletion_timestamp_on_create_is_cleared(server, ns):
    obj = cm("ts")
    obj["metadata"]["deletionTimestamp"] = "2020-01-01T00:00:00Z"
    r = server.post(_cm_path(ns), obj)
    assert r.status == 201, r
    assert "deletionTimestamp" not in r.json["metadata"], r.json
    assert "deletionTimestamp" not in server.get(_cm_path(ns, "ts")).json["metadata"]


def test_deletion_timestamp_cannot_be_set_by_update(server, ns):
    server.post(_cm_path(ns), cm("ts"))
    r = server.patch(_cm_path(ns, "ts"), {"metadata": {"deletionTimestamp": "2020-01-01T00:00:00Z"}})
    st = assert_status(r, 422, "Invalid")
    assert "metadata.deletionTimestamp" in st["message"] and "field is immutable" in st["message"], st
    assert "deletionTimestamp" not in server.get(_cm_path(ns, "ts")).json["metadata"]


# ---------------------------------------------------------------- graceful pod deletion


def _pods(ns, name=""):
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


def test_pod_on_node_delete_with_grace_period_is_graceful(server, ns):
    assert server.post(_pods(ns), pod("g", node="node-1")).status == 201
    r = server.delete(_pods(ns, "g"), query={"gracePeriodSeconds": "2"})
    assert r.status == 200, r
    body = r.json
    assert body["kind"] == "Pod", body
    assert body["metadata"].get("deletionTimestamp"), body
    assert body["metadata"].get("deletionGracePeriodSeconds") == 2, body
    live = server.get(_pods(ns, "g"))
    assert live.status == 200, "a bound pod stays during its grace period"
    assert live.json["metadata"]["deletionGracePeriodSeconds"] == 2
    # The kubelet finishes the deletion once the containers stopped (at most the grace period).
    wait_for(lambda: server.get(_pods(ns, "g")).status == 404, 8, 0.1, "pod gone after grace")


def test_pod_on_node_default_grace_is_termination_grace_period(server, ns):
    p = pod("g", node="node-1", terminationGracePeriodSeconds=1)
    assert server.post(_pods(ns), p).status == 201
    r = server.delete(_pods(ns, "g"))
    assert r.status == 200, r
    assert r.json["metadata"].get("deletionGracePeriodSeconds") == 1, r.json
    assert r.json["metadata"].get("deletionTimestamp"), r.json
    wait_for(lambda: server.get(_pods(ns, "g")).status == 404, 8, 0.1, "pod gone after grace")


def test_pod_default_grace_is_30_seconds(server, ns):
    assert server.post(_pods(ns), pod("g", node="node-1")).status == 201
    r = server.delete(_pods(ns, "g"))
    assert r.status == 200, r
    assert r.json["metadata"].get("deletionGracePeriodSeconds") == 30, r.json
    assert server.get(_pods(ns, "g")).status == 200
    # clean up at once
    server.delete(_pods(ns, "g"), query={"gracePeriodSeconds": "0"})


def test_pod_grace_period_zero_deletes_at_once(server, ns):
    assert server.post(_pods(ns), pod("g", node="node-1")).status == 201
    r = server.delete(_pods(ns, "g"), query={"gracePeriodSeconds": "0"})
    assert r.status == 200, r
    assert server.get(_pods(ns, "g")).status == 404


def test_unscheduled_pod_is_deleted_at_once(server, ns):
    assert server.post(_pods(ns), pod("u")).status == 201
    r = server.delete(_pods(ns, "u"), query={"gracePeriodSeconds": "30"})
    assert r.status == 200, r
    assert r.json["kind"] == "Pod"
    assert server.get(_pods(ns, "u")).status == 404


def test_shortening_grace_period_of_terminating_pod(server, ns):
    assert server.post(_pods(ns), pod("g", node="node-1")).status == 201
    server.delete(_pods(ns, "g"), query={"gracePeriodSeconds": "30"})
    r = server.delete(_pods(ns, "g"), query={"gracePeriodSeconds": "1"})
    assert r.status == 200, r
    assert r.json["metadata"]["deletionGracePeriodSeconds"] == 1, r.json
    wait_for(lambda: server.get(_pods(ns, "g")).status == 404, 8, 0.1, "pod gone")


# ---------------------------------------------------------------- namespace deletion


def _new_ns(server):
    name = uniq("nsd")
    assert server.post("/api/v1/namespaces", {"metadata": {"name": name}}).status == 201
    return name


def test_namespace_delete_returns_namespace_terminating(server):
    n = _new_ns(server)
    server.post(_cm_path(n), cm("blocker", finalizers=[FIN]))
    r = server.delete(f"/api/v1/namespaces/{n}")
    assert r.status == 200, r
    body = r.json
    assert body["kind"] == "Namespace", body
    assert body["metadata"].get("deletionTimestamp"), body
    assert body["status"]["phase"] == "Terminating", body
    assert body["spec"]["finalizers"] == ["kubernetes"], body
    live = server.get(f"/api/v1/namespaces/{n}").json
    assert live["status"]["phase"] == "Terminating"
    server.patch(_cm_path(n, "blocker"), {"metadata": {"finalizers": None}})


def test_create_in_terminating_namespace_is_forbidden(server):
    n = _new_ns(server)
    server.post(_cm_path(n), cm("blocker", finalizers=[FIN]))
    server.delete(f"/api/v1/namespaces/{n}")
    r = server.post(_cm_path(n), cm("late"))
    st = assert_status(r, 403, "Forbidden")
    assert st["message"] == (f'configmaps "late" is forbidden: unable to create new content in '
                             f'namespace {n} because it is being terminated'), st
    causes = st.get("details", {}).get("causes", [])
    assert {"reason": "NamespaceTerminating", "message": f"namespace {n} is being terminated",
            "field": "metadata.namespace"} in causes, st
    server.patch(_cm_path(n, "blocker"), {"metadata": {"finalizers": None}})


def test_namespace_objects_removed_then_namespace_disappears(server):
    n = _new_ns(server)
    for i in range(3):
        server.post(_cm_path(n), cm(f"c{i}"))
    server.post(_pods(n), pod("p"))
    server.delete(f"/api/v1/namespaces/{n}")
    wait_for(lambda: server.get(f"/api/v1/namespaces/{n}").status == 404, 10, 0.1,
             "namespace gone")
    assert server.get(_cm_path(n)).json.get("items", []) == []


def test_namespace_waits_for_finalizers_of_its_objects(server):
    n = _new_ns(server)
    server.post(_cm_path(n), cm("blocker", finalizers=[FIN]))
    server.post(_cm_path(n), cm("free"))
    server.delete(f"/api/v1/namespaces/{n}")
    # the content is deleted: the free one disappears, the finalized one is terminating
    wait_for(lambda: server.get(_cm_path(n, "free")).status == 404, 10, 0.1, "free cm deleted")
    wait_for(lambda: server.get(_cm_path(n, "blocker")).json["metadata"].get("deletionTimestamp"),
             10, 0.1, "blocker terminating")
    # the namespace stays while the finalizer is there, and says why
    wait_for(lambda: {c["type"]: c for c in server.get(f"/api/v1/namespaces/{n}").json["status"]
                      .get("conditions", [])}.get("NamespaceFinalizersRemaining", {})
             .get("status") == "True", 10, 0.1, "condition NamespaceFinalizersRemaining=True")
    ns_obj = server.get(f"/api/v1/namespaces/{n}")
    assert ns_obj.status == 200 and ns_obj.json["status"]["phase"] == "Terminating"
    server.patch(_cm_path(n, "blocker"), {"metadata": {"finalizers": None}})
    wait_for(lambda: server.get(f"/api/v1/namespaces/{n}").status == 404, 10, 0.1,
             "namespace gone once the finalizer is removed")


def test_namespace_with_bound_pod_deleted_gracefully(server):
    n = _new_ns(server)
    server.post(_pods(n), pod("p", node="node-1", terminationGracePeriodSeconds=1))
    server.delete(f"/api/v1/namespaces/{n}")
    wait_for(lambda: server.get(f"/api/v1/namespaces/{n}").status == 404, 10, 0.1,
             "namespace gone")


# ---------------------------------------------------------------- garbage collection


def _owner_ref(owner, block=None):
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"]}
    if block is not None:
        ref["blockOwnerDeletion"] = block
    return ref


def _owner_and_dependents(server, ns, n=2, block=None, dep_finalizers=None):
    owner = server.post(_cm_path(ns), cm("owner")).json
    deps = []
    for i in range(n):
        meta = {"ownerReferences": [_owner_ref(owner, block)]}
        if dep_finalizers:
            meta["finalizers"] = dep_finalizers
        deps.append(server.post(_cm_path(ns), cm(f"dep{i}", **meta)).json)
    return owner, deps


def test_background_propagation_collects_dependents(server, ns):
    _owner_and_dependents(server, ns)
    r = server.delete(_cm_path(ns, "owner"), {"kind": "DeleteOptions", "apiVersion": "v1",
                                              "propagationPolicy": "Background"})
    assert r.status == 200, r
    assert server.get(_cm_path(ns, "owner")).status == 404, "the owner goes at once"
    wait_for(lambda: all(server.get(_cm_path(ns, f"dep{i}")).status == 404 for i in range(2)),
             10, 0.1, "dependents garbage collected")


def test_default_propagation_for_configmaps_is_background(server, ns):
    _owner_and_dependents(server, ns, n=1)
    assert server.delete(_cm_path(ns, "owner")).status == 200
    wait_for(lambda: server.get(_cm_path(ns, "dep0")).status == 404, 10, 0.1,
             "dependent garbage collected")


def test_dependent_with_other_live_owner_is_kept(server, ns):
    owner = server.post(_cm_path(ns), cm("owner")).json
    other = server.post(_cm_path(ns), cm("other")).json
    server.post(_cm_path(ns), cm("dep", ownerReferences=[_owner_ref(owner), _owner_ref(other)]))
    server.post(_cm_path(ns), cm("canary", ownerReferences=[_owner_ref(owner)]))
    server.delete(_cm_path(ns, "owner"), query={"propagationPolicy": "Background"})
    wait_for(lambda: server.get(_cm_path(ns, "canary")).status == 404, 10, 0.1, "canary collected")
    dep = server.get(_cm_path(ns, "dep"))
    assert dep.status == 200, "a dependent with a remaining live owner stays"
    refs = [r["name"] for r in dep.json["metadata"]["ownerReferences"]]
    assert "other" in refs


def test_foreground_propagation_blocks_owner_until_dependents_gone(server, ns):
    _owner_and_dependents(server, ns, n=1, block=True, dep_finalizers=[FIN])
    r = server.delete(_cm_path(ns, "owner"), {"kind": "DeleteOptions", "apiVersion": "v1",
                                              "propagationPolicy": "Foreground"})
    assert r.status in (200, 202), r
    body = r.json
    assert body["kind"] == "ConfigMap", body
    assert "foregroundDeletion" in body["metadata"].get("finalizers", []), body
    assert body["metadata"].get("deletionTimestamp"), body
    # the GC deletes the dependent (it is kept by its own finalizer) and the owner waits for it
    wait_for(lambda: server.get(_cm_path(ns, "dep0")).json["metadata"].get("deletionTimestamp"),
             10, 0.1, "dependent being deleted")
    owner = server.get(_cm_path(ns, "owner"))
    assert owner.status == 200
    assert "foregroundDeletion" in owner.json["metadata"]["finalizers"]
    server.patch(_cm_path(ns, "dep0"), {"metadata": {"finalizers": None}})
    wait_for(lambda: server.get(_cm_path(ns, "owner")).status == 404, 10, 0.1,
             "owner deleted once the blocking dependent is gone")


def test_orphan_propagation_keeps_dependents_and_strips_owner_reference(server, ns):
    _owner_and_dependents(server, ns, n=2)
    r = server.delete(_cm_path(ns, "owner"), query={"propagationPolicy": "Orphan"})
    assert r.status in (200, 202), r
    wait_for(lambda: server.get(_cm_path(ns, "owner")).status == 404, 10, 0.1, "owner deleted")
    for i in range(2):
        dep = server.get(_cm_path(ns, f"dep{i}"))
        assert dep.status == 200, "orphaned dependents stay"
        wait_for(lambda: not server.get(_cm_path(ns, f"dep{i}")).json["metadata"]
                 .get("ownerReferences"), 10, 0.1, "ownerReference removed")


def test_invalid_propagation_policy_is_rejected(server, ns):
    server.post(_cm_path(ns), cm("o"))
    r = server.delete(_cm_path(ns, "o"), query={"propagationPolicy": "Sideways"})
    st = assert_status(r, 422, "Invalid")
    assert "propagationPolicy" in st["message"], st
    assert server.get(_cm_path(ns, "o")).status == 200


# ---------------------------------------------------------------- preconditions


def test_delete_precondition_uid_mismatch_is_conflict(server, ns):
    created = server.post(_cm_path(ns), cm("pc")).json
    r = server.delete(_cm_path(ns, "pc"), {"kind": "DeleteOptions", "apiVersion": "v1",
                                           "preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}})
    st = assert_status(r, 409, "Conflict")
    assert st["message"].startswith('Operation cannot be fulfilled on configmaps "pc": Precondition failed: UID in precondition: 00000000-0000-0000-0000-000000000000, UID in object meta: ' + created["metadata"]["uid"]), st
    assert server.get(_cm_path(ns, "pc")).status == 200


def test_delete_precondition_resource_version_mismatch_is_conflict(server, ns):
    created = server.post(_cm_path(ns), cm("pc")).json
    server.patch(_cm_path(ns, "pc"), {"data": {"k": "changed"}})
    r = server.delete(_cm_path(ns, "pc"), {"kind": "DeleteOptions", "apiVersion": "v1",
                                           "preconditions": {"resourceVersion": created["metadata"]["resourceVersion"]}})
    st = assert_status(r, 409, "Conflict")
    assert "Precondition failed: ResourceVersion in precondition: " + created["metadata"]["resourceVersion"] in st["message"], st
    assert server.get(_cm_path(ns, "pc")).status == 200


def test_delete_preconditions_matching_delete(server, ns):
    created = server.post(_cm_path(ns), cm("pc")).json
    r = server.delete(_cm_path(ns, "pc"), {"kind": "DeleteOptions", "apiVersion": "v1",
                                           "preconditions": {"uid": created["metadata"]["uid"],
                                                             "resourceVersion": created["metadata"]["resourceVersion"]}})
    assert r.status == 200, r
    assert server.get(_cm_path(ns, "pc")).status == 404


# ---------------------------------------------------------------- DELETE response bodies


def test_delete_configmap_returns_success_status_with_details(server, ns):
    created = server.post(_cm_path(ns), cm("gone")).json
    r = server.delete(_cm_path(ns, "gone"))
    assert r.status == 200, r
    st = status_of(r)
    assert st["status"] == "Success", st
    assert st["details"] == {"name": "gone", "kind": "configmaps", "uid": created["metadata"]["uid"]}, st


def test_delete_pod_returns_the_pod(server, ns):
    server.post(_pods(ns), pod("gone"))
    r = server.delete(_pods(ns, "gone"))
    assert r.status == 200, r
    assert r.json["kind"] == "Pod" and r.json["metadata"]["name"] == "gone", r.json


def test_delete_service_returns_the_service(server, ns):
    from conftest import svc
    server.post(f"/api/v1/namespaces/{ns}/services", svc("gone"))
    r = server.delete(f"/api/v1/namespaces/{ns}/services/gone")
    assert r.status == 200, r
    assert r.json["kind"] == "Service" and r.json["metadata"]["name"] == "gone", r.json


def test_delete_serviceaccount_returns_the_serviceaccount(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "gone"}})
    r = server.delete(f"/api/v1/namespaces/{ns}/serviceaccounts/gone")
    assert r.status == 200, r
    assert r.json["kind"] == "ServiceAccount", r.json


def test_delete_secret_returns_status(server, ns):
    server.post(f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "gone"}, "data": {}})
    r = server.delete(f"/api/v1/namespaces/{ns}/secrets/gone")
    assert r.status == 200, r
    st = status_of(r)
    assert st["status"] == "Success" and st["details"]["kind"] == "secrets", st


def test_delete_missing_is_404_with_message(server, ns):
    r = server.delete(_cm_path(ns, "nope"))
    assert_status(r, 404, "NotFound", 'configmaps "nope" not found')


# ---------------------------------------------------------------- deletecollection


def test_deletecollection_with_label_selector(server, ns):
    server.post(_cm_path(ns), cm("a", labels={"x": "1"}))
    server.post(_cm_path(ns), cm("b", labels={"x": "1"}))
    server.post(_cm_path(ns), cm("c", labels={"x": "2"}))
    rv = _list_rv(server, _cm_path(ns))
    r = server.delete(_cm_path(ns), query={"labelSelector": "x=1"})
    assert r.status == 200, r
    body = r.json
    assert body["kind"] == "ConfigMapList", body
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["a", "b"]
    names = [i["metadata"]["name"] for i in server.get(_cm_path(ns), query={"labelSelector": "x"}).json["items"]]
    assert names == ["c"]
    ev = server.watch(_cm_path(ns), {"resourceVersion": rv, "timeoutSeconds": "1",
                                     "labelSelector": "x"})
    assert sorted((e["type"], e["object"]["metadata"]["name"]) for e in ev) == [
        ("DELETED", "a"), ("DELETED", "b")], ev


def test_deletecollection_respects_finalizers(server, ns):
    server.post(_cm_path(ns), cm("a", finalizers=[FIN]))
    server.post(_cm_path(ns), cm("b"))
    r = server.delete(_cm_path(ns))
    assert r.status == 200, r
    a = server.get(_cm_path(ns, "a"))
    assert a.status == 200 and a.json["metadata"].get("deletionTimestamp"), a
    assert server.get(_cm_path(ns, "b")).status == 404
    server.patch(_cm_path(ns, "a"), {"metadata": {"finalizers": None}})
