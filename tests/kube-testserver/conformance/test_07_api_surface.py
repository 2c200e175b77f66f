"""Item 7: the API surface beyond the core kinds, through the official Python client's typed
APIs (create, read, list, patch, replace, delete), and `kubectl apply -f deploy/`.
"""

import os
import subprocess
import re
import shutil

import pytest

from conftest import REPO, uniq, wait_for


@pytest.fixture
def k8s(api_client):
    from kubernetes import client
    return client, api_client


def _crud(create, read, lst, patch, replace, delete, body, name, ns=None, mutate=None):
    """Runs the typed CRUD cycle; `mutate(obj)` changes the object for replace."""
    args = (ns,) if ns else ()
    created = create(*args, body)
    assert created.metadata.name == name
    assert created.metadata.uid and created.metadata.resource_version
    got = read(name, *args)
    assert got.metadata.uid == created.metadata.uid
    items = [i.metadata.name for i in lst(*args).items]
    assert name in items
    patched = patch(name, *args, {"metadata": {"labels": {"conformance": "patched"}}})
    assert patched.metadata.labels["conformance"] == "patched"
    if mutate:
        mutate(patched)
    replaced = replace(name, *args, patched)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version) or \
        replaced.metadata.resource_version != created.metadata.resource_version
    delete(name, *args)
    from kubernetes.client.rest import ApiException

    def gone():
        try:
            read(name, *args)
            return False
        except ApiException as e:
            return e.status == 404
    wait_for(gone, 5, msg=f"{name} deleted")
    return replaced


def _pod_template(app):
    return {"metadata": {"labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}}


def test_apps_v1_deployments(k8s, ns):
    client, api = k8s
    a = client.AppsV1Api(api)
    n = uniq("dep")
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": n},
            "spec": {"selector": {"matchLabels": {"app": n}}, "template": _pod_template(n)}}

    def mutate(o):
        o.spec.replicas = 2
    r = _crud(a.create_namespaced_deployment, a.read_namespaced_deployment,
              a.list_namespaced_deployment, a.patch_namespaced_deployment,
              a.replace_namespaced_deployment, a.delete_namespaced_deployment, body, n, ns, mutate)
    assert r.spec.replicas == 2


def test_apps_v1_daemonsets(k8s, ns):
    client, api = k8s
    a = client.AppsV1Api(api)
    n = uniq("ds")
    body = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": n},
            "spec": {"selector": {"matchLabels": {"app": n}}, "template": _pod_template(n)}}
    r = _crud(a.create_namespaced_daemon_set, a.read_namespaced_daemon_set,
              a.list_namespaced_daemon_set, a.patch_namespaced_daemon_set,
              a.replace_namespaced_daemon_set, a.delete_namespaced_daemon_set, body, n, ns)
    assert r.spec.update_strategy.type == "RollingUpdate"
    assert r.spec.revision_history_limit == 10


def test_apps_v1_statefulsets(k8s, ns):
    client, api = k8s
    a = client.AppsV1Api(api)
    n = uniq("sts")
    body = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": n},
            "spec": {"serviceName": n, "selector": {"matchLabels": {"app": n}},
                     "template": _pod_template(n)}}
    r = _crud(a.create_namespaced_stateful_set, a.read_namespaced_stateful_set,
              a.list_namespaced_stateful_set, a.patch_namespaced_stateful_set,
              a.replace_namespaced_stateful_set, a.delete_namespaced_stateful_set, body, n, ns)
    assert r.spec.pod_management_policy == "OrderedReady"
    assert r.spec.replicas == 1


def test_apps_v1_replicasets(k8s, ns):
    client, api = k8s
    a = client.AppsV1Api(api)
    n = uniq("rs")
    body = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": n},
            "spec": {"selector": {"matchLabels": {"app": n}}, "template": _pod_template(n)}}
    _crud(a.create_namespaced_replica_set, a.read_namespaced_replica_set,
          a.list_namespaced_replica_set, a.patch_namespaced_replica_set,
          a.replace_namespaced_replica_set, a.delete_namespaced_replica_set, body, n, ns)


def _rules():
    return [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]


def test_rbac_roles_and_rolebindings(k8s, ns):
    client, api = k8s
    rb = client.RbacAuthorizationV1Api(api)
    n = uniq("role")
    _crud(rb.create_namespaced_role, rb.read_namespaced_role, rb.list_namespaced_role,
          rb.patch_namespaced_role, rb.replace_namespaced_role, rb.delete_namespaced_role,
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
           "metadata": {"name": n}, "rules": _rules()}, n, ns)
    b = uniq("rb")
    _crud(rb.create_namespaced_role_binding, rb.read_namespaced_role_binding,
          rb.list_namespaced_role_binding, rb.patch_namespaced_role_binding,
          rb.replace_namespaced_role_binding, rb.delete_namespaced_role_binding,
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": b},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n},
           "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]}, b, ns)


def test_rbac_clusterroles_and_clusterrolebindings(k8s):
    client, api = k8s
    rb = client.RbacAuthorizationV1Api(api)
    n = uniq("cr")
    _crud(rb.create_cluster_role, rb.read_cluster_role, rb.list_cluster_role,
          rb.patch_cluster_role, rb.replace_cluster_role, rb.delete_cluster_role,
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": n}, "rules": _rules()}, n)
    b = uniq("crb")
    _crud(rb.create_cluster_role_binding, rb.read_cluster_role_binding,
          rb.list_cluster_role_binding, rb.patch_cluster_role_binding,
          rb.replace_cluster_role_binding, rb.delete_cluster_role_binding,
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": b},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": n},
           "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]}, b)


def test_rbac_role_ref_is_immutable(k8s, ns):
    from kubernetes.client.rest import ApiException
    client, api = k8s
    rb = client.RbacAuthorizationV1Api(api)
    b = uniq("rb")
    rb.create_namespaced_role_binding(ns, {
        "metadata": {"name": b},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "a"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]})
    with pytest.raises(ApiException) as e:
        rb.patch_namespaced_role_binding(b, ns, {"roleRef": {"name": "b"}})
    assert e.value.status == 422
    assert "roleRef: Invalid value" in e.value.body and "cannot change roleRef" in e.value.body


def test_policy_v1_poddisruptionbudgets(k8s, ns):
    client, api = k8s
    p = client.PolicyV1Api(api)
    n = uniq("pdb")
    _crud(p.create_namespaced_pod_disruption_budget, p.read_namespaced_pod_disruption_budget,
          p.list_namespaced_pod_disruption_budget, p.patch_namespaced_pod_disruption_budget,
          p.replace_namespaced_pod_disruption_budget, p.delete_namespaced_pod_disruption_budget,
          {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": n},
           "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": n}}}}, n, ns)


def test_batch_v1_jobs(k8s, ns):
    client, api = k8s
    b = client.BatchV1Api(api)
    n = uniq("job")
    tmpl = _pod_template(n)
    tmpl["spec"]["restartPolicy"] = "Never"
    created = b.create_namespaced_job(ns, {"apiVersion": "batch/v1", "kind": "Job",
                                           "metadata": {"name": n},
                                           "spec": {"template": tmpl}})
    # the apiserver generates the selector and the controller-uid labels
    assert created.spec.selector.match_labels["batch.kubernetes.io/controller-uid"] == created.metadata.uid
    assert created.spec.template.metadata.labels["batch.kubernetes.io/job-name"] == n
    assert created.spec.backoff_limit == 6 and created.spec.completions == 1
    assert created.spec.completion_mode == "NonIndexed"
    assert b.read_namespaced_job(n, ns).metadata.uid == created.metadata.uid
    assert n in [j.metadata.name for j in b.list_namespaced_job(ns).items]
    b.patch_namespaced_job(n, ns, {"metadata": {"labels": {"x": "y"}}})
    b.delete_namespaced_job(n, ns, propagation_policy="Background")


def test_batch_v1_cronjobs(k8s, ns):
    client, api = k8s
    b = client.BatchV1Api(api)
    n = uniq("cj")
    tmpl = _pod_template(n)
    tmpl["spec"]["restartPolicy"] = "OnFailure"
    body = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": n},
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": tmpl}}}}

    def mutate(o):
        o.spec.suspend = True
    r = _crud(b.create_namespaced_cron_job, b.read_namespaced_cron_job, b.list_namespaced_cron_job,
              b.patch_namespaced_cron_job, b.replace_namespaced_cron_job, b.delete_namespaced_cron_job,
              body, n, ns, mutate)
    assert r.spec.suspend is True
    assert r.spec.concurrency_policy == "Allow"
    assert r.spec.successful_jobs_history_limit == 3 and r.spec.failed_jobs_history_limit == 1


def test_batch_v1_cronjob_invalid_schedule_is_422(k8s, ns):
    from kubernetes.client.rest import ApiException
    client, api = k8s
    b = client.BatchV1Api(api)
    tmpl = _pod_template("x")
    tmpl["spec"]["restartPolicy"] = "OnFailure"
    with pytest.raises(ApiException) as e:
        b.create_namespaced_cron_job(ns, {"metadata": {"name": "bad"},
                                          "spec": {"schedule": "every tuesday",
                                                   "jobTemplate": {"spec": {"template": tmpl}}}})
    assert e.value.status == 422 and "spec.schedule" in e.value.body


def test_networking_v1_networkpolicies(k8s, ns):
    client, api = k8s
    nw = client.NetworkingV1Api(api)
    n = uniq("np")
    r = _crud(nw.create_namespaced_network_policy, nw.read_namespaced_network_policy,
              nw.list_namespaced_network_policy, nw.patch_namespaced_network_policy,
              nw.replace_namespaced_network_policy, nw.delete_namespaced_network_policy,
              {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": n},
               "spec": {"podSelector": {"matchLabels": {"app": n}},
                        "ingress": [{"ports": [{"port": 80}]}]}}, n, ns)
    assert r.spec.policy_types == ["Ingress"]
    assert r.spec.ingress[0].ports[0].protocol == "TCP"


def test_core_serviceaccounts(k8s, ns):
    client, api = k8s
    v1 = client.CoreV1Api(api)
    n = uniq("sa")
    _crud(v1.create_namespaced_service_account, v1.read_namespaced_service_account,
          v1.list_namespaced_service_account, v1.patch_namespaced_service_account,
          v1.replace_namespaced_service_account, v1.delete_namespaced_service_account,
          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": n}}, n, ns)


def test_list_across_namespaces(k8s, ns):
    client, api = k8s
    a = client.AppsV1Api(api)
    n = uniq("dep")
    a.create_namespaced_deployment(ns, {"metadata": {"name": n}, "spec": {
        "selector": {"matchLabels": {"app": n}}, "template": _pod_template(n)}})
    names = [(d.metadata.namespace, d.metadata.name)
             for d in a.list_deployment_for_all_namespaces().items]
    assert (ns, n) in names


def _render_deploy(tmp, ns):
    """deploy/ as users install it: a per-cluster overlay of deploy/overlays/kind rendered with
    kubectl's kustomize, moved into the test's namespace (cluster-scoped names prefixed)."""
    overlay = tmp / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(REPO / "deploy" / "overlays" / "kind", overlay)
    (overlay / "kustomization.yaml").write_text(f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [{rel}]
configMapGenerator:
  - name: clustermesh-config
    namespace: kube-system
    behavior: replace
    literals: [CLUSTER_NAME=conf, CLUSTER_ID=7, MESH_ENDPOINT=192.0.2.1:32379]
replacements:
  - source: {{kind: ConfigMap, name: clustermesh-config, fieldPath: data.MESH_ENDPOINT}}
    targets:
      - select: {{kind: Service, name: clustermesh-apiserver}}
        fieldPaths: ["metadata.annotations.[clustermesh.dev/mesh-endpoints]"]
""")
    p = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = p.stdout.replace("namespace: kube-system", f"namespace: {ns}")
    text = text.replace(".kube-system.svc", f".{ns}.svc")
    # cluster-scoped names are shared by every test: give them the test's own
    text = re.sub(r"(kind: ClusterRole(?:Binding)?\nmetadata:\n(?:  .*\n)*?  name: )clustermesh-apiserver",
                  rf"\g<1>{ns}-apiserver", text)
    text = text.replace("kind: ClusterRole\n  name: clustermesh-apiserver", f"kind: ClusterRole\n  name: {ns}-apiserver")
    out = tmp / "deploy.yaml"
    out.write_text(text)
    return out


def test_kubectl_apply_deploy_manifests(server, ns, tmp):
    out = _render_deploy(tmp, ns)
    p = server.kubectl("apply", "-f", str(out))
    expected = [
        "serviceaccount/clustermesh-apiserver", "serviceaccount/clustermesh-node-agent",
        f"clusterrole.rbac.authorization.k8s.io/{ns}-apiserver",
        f"clusterrolebinding.rbac.authorization.k8s.io/{ns}-apiserver",
        "role.rbac.authorization.k8s.io/clustermesh-apiserver",
        "rolebinding.rbac.authorization.k8s.io/clustermesh-apiserver",
        "service/clustermesh-etcd", "statefulset.apps/clustermesh-etcd",
        "service/clustermesh-apiserver", "deployment.apps/clustermesh-apiserver",
        "poddisruptionbudget.policy/clustermesh-apiserver",
        "daemonset.apps/clustermesh-node-agent",
        "networkpolicy.networking.k8s.io/clustermesh-etcd",
    ]
    for e in expected:
        assert f"{e} created" in p.stdout, p.stdout
    svc = server.kubectl_json("-n", ns, "get", "service", "clustermesh-apiserver")
    assert svc["spec"]["ports"][0]["nodePort"] == 32379
    assert svc["metadata"]["annotations"]["clustermesh.dev/mesh-endpoints"] == "192.0.2.1:32379"
    etcd = server.kubectl_json("-n", ns, "get", "service", "clustermesh-etcd")
    assert etcd["spec"]["clusterIP"] == "None", "etcd's Service is headless"
    ds = server.kubectl_json("-n", ns, "get", "daemonset", "clustermesh-node-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet" and pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["privileged"] is False
    # a second apply writes nothing
    before = server.kubectl("get", "-f", str(out), "-o", "jsonpath={.items[*].metadata.resourceVersion}").stdout
    server.kubectl("apply", "-f", str(out))
    after = server.kubectl("get", "-f", str(out), "-o", "jsonpath={.items[*].metadata.resourceVersion}").stdout
    assert before == after and before.strip(), (before, after)
    server.kubectl("delete", "-f", str(out), "--wait=false")
