"""Item 1: boolean query parameters.

The apiserver decodes query booleans with `runtime.Convert_Slice_string_To_bool`: only an absent
value, "0" or a case-insensitive "false" is false; anything else (`True`, `1`, `true`, `yes`)
is true. Debian's python3-kubernetes 22.6 sends `watch=True` (Python's str(True)), so that
spelling must stream like `watch=true`.
"""

import pytest

from conftest import ROOT_CA, cm, uniq


def _seed(server, ns):
    r = server.post(f"/api/v1/namespaces/{ns}/configmaps", cm("a"))
    assert r.status == 201, r
    lst = server.get(f"/api/v1/namespaces/{ns}/configmaps").json
    return lst["metadata"]["resourceVersion"]


@pytest.mark.parametrize("value", ["True", "1", "true", "TRUE", "t"])
def test_watch_truthy_spellings_stream(server, ns, value):
    _seed(server, ns)
    # A watch without resourceVersion starts with synthetic ADDED events for what exists.
    w = server.watch(f"/api/v1/namespaces/{ns}/configmaps",
                     {"watch": value, "timeoutSeconds": "1"}, max_seconds=8)
    assert w, f"watch={value} returned no events"
    assert all("type" in e and "object" in e for e in w), w
    assert any(e["type"] == "ADDED" and e["object"]["metadata"]["name"] == "a" for e in w), w


@pytest.mark.parametrize("value", ["false", "0", "False", "FALSE"])
def test_watch_falsy_spellings_list(server, ns, value):
    _seed(server, ns)
    r = server.get(f"/api/v1/namespaces/{ns}/configmaps", query={"watch": value})
    assert r.status == 200, r
    body = r.json
    assert body["kind"] == "ConfigMapList", body
    assert [i["metadata"]["name"] for i in body["items"] if i["metadata"]["name"] != ROOT_CA] == ["a"]


def test_watch_capital_true_through_python_client_call_api(server, ns, api_client):
    """The 22.6 client's exact request: `watch=True` passed through `call_api` unparsed."""
    _seed(server, ns)
    # (37.x's generator: param_serialize builds the URL, headers and auth; call_api sends it)
    method, url, headers, body, post = api_client.param_serialize(
        "GET", f"/api/v1/namespaces/{ns}/configmaps",
        query_params=[("watch", "True"), ("timeoutSeconds", 1)],
        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
    assert "watch=True" in url, url
    r = api_client.call_api(method, url, headers, body, post, _request_timeout=10)
    assert r.status == 200, r.status
    data = r.read().decode()
    lines = [ln for ln in data.splitlines() if ln.strip()]
    assert lines, data
    import json
    ev = [json.loads(ln) for ln in lines]
    assert ev[0]["type"] == "ADDED", ev
    assert ev[0]["object"]["metadata"]["name"] == "a"


@pytest.mark.parametrize("value", ["True", "true", "1"])
def test_allow_watch_bookmarks_truthy_gives_bookmarks(server, ns, value):
    rv = _seed(server, ns)
    # With timeoutSeconds=4 the watch cache schedules one bookmark 2 s before the deadline.
    w = server.watch(f"/api/v1/namespaces/{ns}/configmaps",
                     {"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": value,
                      "timeoutSeconds": "4"}, max_seconds=10)
    bookmarks = [e for e in w if e["type"] == "BOOKMARK"]
    assert bookmarks, w
    obj = bookmarks[0]["object"]
    assert obj["kind"] == "ConfigMap" and obj["apiVersion"] == "v1", obj
    assert obj["metadata"]["resourceVersion"], obj


def test_python_client_watch_stream_sees_added_modified_deleted(server, ns, api_client):
    from kubernetes import client, watch

    v1 = client.CoreV1Api(api_client)
    name = uniq("cm")
    rv = v1.list_namespaced_config_map(ns).metadata.resource_version
    v1.create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=name), data={"k": "1"}))
    v1.patch_namespaced_config_map(name, ns, {"data": {"k": "2"}})
    v1.delete_namespaced_config_map(name, ns)
    seen = []
    w = watch.Watch()
    for ev in w.stream(v1.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=2,
                       field_selector=f"metadata.name={name}", _request_timeout=10):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["type"] == "DELETED":
            w.stop()
    assert seen == [("ADDED", name), ("MODIFIED", name), ("DELETED", name)], seen
