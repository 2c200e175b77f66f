//! kubectl's typed `create` commands send their objects as protobuf: each one here runs against
//! the server, is checked to have sent protobuf, and the stored object (`kubectl get -o json`)
//! must hold everything kubectl's own JSON of the object (`--dry-run=client -o json`) holds,
//! plus the field types that matter (int-or-string ports, quantities, exact secret bytes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use base64::Engine;
use kube_testserver::Handle;
use serde_json::{Value, json};

/// Runs kubectl against the server; returns (success, stdout, stderr).
fn kubectl(h: &Handle, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(h.kubeconfig())
        .args(["--context", h.context(), "--request-timeout", "20s"])
        .args(args)
        .env("HOME", h.kubeconfig().parent().unwrap())
        .output()
        .expect("kubectl must be installed (it is on the project's machines)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(h: &Handle, args: &[&str]) -> String {
    let (success, out, err) = kubectl(h, args);
    assert!(success, "kubectl {args:?} failed: {err}{out}");
    out
}

fn json(h: &Handle, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&ok(h, &a)).unwrap()
}

/// Every value of Go's JSON `expected` is in `actual` (`null`s and `""`s, which the server may
/// fill in, excepted); lists are compared element by element.
fn assert_holds(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                if ev.is_null() || ev == "" {
                    continue;
                }
                let p = format!("{path}.{k}");
                let av = a
                    .get(k)
                    .unwrap_or_else(|| panic!("{p} missing: expected {ev}, object {actual}"));
                assert_holds(ev, av, &p);
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(e.len(), a.len(), "{path}: {expected} vs {actual}");
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                assert_holds(ev, av, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(expected, actual, "{path}"),
    }
}

/// Runs `kubectl create <args> [-- <command>]` for real, checking that kubectl sent protobuf,
/// then returns the stored object after checking it against kubectl's dry-run JSON.
fn create(h: &Handle, args: &[&str], command: &[&str], get: &[&str]) -> Value {
    fn with<'a>(args: &[&'a str], extra: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["create"];
        a.extend(args);
        a.extend(extra);
        if !command.is_empty() {
            a.push("--");
            a.extend(command);
        }
        a
    }
    let mut expected: Value = serde_json::from_str(&ok(
        h,
        &with(args, &["--dry-run=client", "-o", "json"], command),
    ))
    .unwrap();
    // status is the server's: a create resets it, as the apiserver does
    if let Some(o) = expected.as_object_mut() {
        o.remove("status");
    }
    let (success, out, err) = kubectl(h, &with(args, &["-v=8"], command));
    assert!(success, "kubectl create {args:?} failed: {err}{out}");
    assert!(
        err.lines()
            .any(|l| l.contains("Content-Type: application/vnd.kubernetes.protobuf")),
        "kubectl create {args:?} did not send protobuf"
    );
    let stored = json(h, get);
    assert_holds(&expected, &stored, &format!("create {}", args.join(" ")));
    stored
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(
            v.as_str()
                .unwrap_or_else(|| panic!("{v} is not base64 text")),
        )
        .unwrap()
}

fn served(h: &Handle, resource: &str) -> bool {
    ok(h, &["api-resources", "-o", "name"])
        .lines()
        .any(|l| l == resource)
}

/// Serves a built-in resource the test server does not have as a CRD of the same group,
/// version, names and scope, so that kubectl's protobuf body for it reaches the decoder.
fn serve_as_crd(h: &Handle, dir: &Path, group: &str, plural: &str, kind: &str, namespaced: bool) {
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{group}"),
            "annotations": {"api-approved.kubernetes.io": "unapproved, test only"},
        },
        "spec": {
            "group": group,
            "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
            "scope": if namespaced { "Namespaced" } else { "Cluster" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    });
    let file = dir.join(format!("{plural}.json"));
    std::fs::write(&file, crd.to_string()).unwrap();
    ok(
        h,
        &["create", "--validate=false", "-f", file.to_str().unwrap()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_typed_creates_send_protobuf_the_server_decodes() {
    let h = common::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bin: Vec<u8> = (0..=255u8).collect();
    let bin_file = dir.path().join("bin.dat");
    std::fs::write(&bin_file, &bin).unwrap();
    let bin_arg = format!("--from-file=bin={}", bin_file.display());

    let ns = create(
        &h,
        &["namespace", "shop"],
        &[],
        &["get", "namespace", "shop"],
    );
    assert_eq!(ns["metadata"]["name"], "shop");

    let svc = create(
        &h,
        &[
            "service",
            "clusterip",
            "web",
            "--tcp=80:8080",
            "--tcp=443:https",
            "-n",
            "shop",
        ],
        &[],
        &["get", "service", "web", "-n", "shop"],
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(
        svc["spec"]["ports"][0]["targetPort"], 8080,
        "an int targetPort stays an int"
    );
    assert_eq!(svc["spec"]["ports"][1]["targetPort"], "https");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(svc["spec"]["selector"]["app"], "web");
    assert!(svc["spec"]["clusterIP"].as_str().unwrap().contains('.'));

    let np = create(
        &h,
        &[
            "service",
            "nodeport",
            "np",
            "--tcp=80:8080",
            "--node-port=30080",
            "-n",
            "shop",
        ],
        &[],
        &["get", "service", "np", "-n", "shop"],
    );
    assert_eq!(np["spec"]["type"], "NodePort");
    assert_eq!(np["spec"]["ports"][0]["nodePort"], 30080);

    let deploy = create(
        &h,
        &[
            "deployment",
            "web",
            "--image=nginx:1.27",
            "--replicas=3",
            "--port=80",
            "-n",
            "shop",
        ],
        &[],
        &["get", "deployment", "web", "-n", "shop"],
    );
    assert_eq!(deploy["spec"]["replicas"], 3);
    assert_eq!(deploy["metadata"]["labels"]["app"], "web");
    assert_eq!(deploy["spec"]["selector"]["matchLabels"]["app"], "web");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:1.27");
    assert_eq!(c["ports"][0]["containerPort"], 80);
    let zero = create(
        &h,
        &[
            "deployment",
            "zero",
            "--image=nginx:1.27",
            "--replicas=0",
            "-n",
            "shop",
        ],
        &[],
        &["get", "deployment", "zero", "-n", "shop"],
    );
    assert_eq!(
        zero["spec"]["replicas"], 0,
        "an explicit zero replicas is kept"
    );

    create(
        &h,
        &["serviceaccount", "sa1", "-n", "shop"],
        &[],
        &["get", "serviceaccount", "sa1", "-n", "shop"],
    );

    let role = create(
        &h,
        &[
            "role",
            "r1",
            "--verb=get,list",
            "--resource=pods,deployments.apps",
            "--resource-name=x",
            "-n",
            "shop",
        ],
        &[],
        &["get", "role", "r1", "-n", "shop"],
    );
    let rules = role["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["apiGroups"] == json!([""]) && r["resources"] == json!(["pods"])),
        "the core group's \"\" survives in a list: {rules:?}"
    );
    assert!(rules.iter().any(|r| r["apiGroups"] == json!(["apps"])));
    assert_eq!(rules[0]["verbs"], json!(["get", "list"]));
    assert_eq!(rules[0]["resourceNames"], json!(["x"]));

    let rb = create(
        &h,
        &[
            "rolebinding",
            "rb1",
            "--role=r1",
            "--serviceaccount=shop:sa1",
            "--user=bob",
            "-n",
            "shop",
        ],
        &[],
        &["get", "rolebinding", "rb1", "-n", "shop"],
    );
    assert_eq!(
        rb["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r1"})
    );
    let subjects = rb["subjects"].as_array().unwrap();
    assert!(
        subjects.contains(&json!({"kind": "ServiceAccount", "name": "sa1", "namespace": "shop"}))
    );
    assert!(subjects.contains(
        &json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"})
    ));

    let cr = create(
        &h,
        &[
            "clusterrole",
            "cr1",
            "--verb=get",
            "--resource=nodes",
            "--non-resource-url=/healthz",
        ],
        &[],
        &["get", "clusterrole", "cr1"],
    );
    assert!(
        cr["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["nonResourceURLs"] == json!(["/healthz"]))
    );
    let crb = create(
        &h,
        &[
            "clusterrolebinding",
            "crb1",
            "--clusterrole=cr1",
            "--group=devs",
        ],
        &[],
        &["get", "clusterrolebinding", "crb1"],
    );
    assert_eq!(crb["subjects"][0]["name"], "devs");
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");

    let job = create(
        &h,
        &["job", "j1", "--image=busybox", "-n", "shop"],
        &["echo", "hi"],
        &["get", "job", "j1", "-n", "shop"],
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["command"], json!(["echo", "hi"]));
    assert_eq!(pod["restartPolicy"], "Never");
    let cj = create(
        &h,
        &[
            "cronjob",
            "cj1",
            "--image=busybox",
            "--schedule=*/5 * * * *",
            "--restart=OnFailure",
            "-n",
            "shop",
        ],
        &["echo", "hi"],
        &["get", "cronjob", "cj1", "-n", "shop"],
    );
    assert_eq!(cj["spec"]["schedule"], "*/5 * * * *");
    assert_eq!(
        cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"],
        "OnFailure"
    );

    let pdb = create(
        &h,
        &[
            "poddisruptionbudget",
            "pdb1",
            "--selector=app=web",
            "--min-available=2",
            "-n",
            "shop",
        ],
        &[],
        &["get", "poddisruptionbudget", "pdb1", "-n", "shop"],
    );
    assert_eq!(pdb["spec"]["minAvailable"], 2, "int-or-string as an int");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"]["app"], "web");
    let pdb2 = create(
        &h,
        &[
            "poddisruptionbudget",
            "pdb2",
            "--selector=app=web",
            "--max-unavailable=50%",
            "-n",
            "shop",
        ],
        &[],
        &["get", "poddisruptionbudget", "pdb2", "-n", "shop"],
    );
    assert_eq!(
        pdb2["spec"]["maxUnavailable"], "50%",
        "int-or-string as a string"
    );

    let s1 = create(
        &h,
        &[
            "secret",
            "generic",
            "s1",
            "--from-literal=a=b",
            &bin_arg,
            "-n",
            "shop",
        ],
        &[],
        &["get", "secret", "s1", "-n", "shop"],
    );
    assert_eq!(b64(&s1["data"]["a"]), b"b");
    assert_eq!(b64(&s1["data"]["bin"]), bin, "secret bytes are exact");
    let crt = h.kubeconfig().parent().unwrap().join("server.crt");
    let key = h.kubeconfig().parent().unwrap().join("server.key");
    let tls = create(
        &h,
        &[
            "secret",
            "tls",
            "s2",
            &format!("--cert={}", crt.display()),
            &format!("--key={}", key.display()),
            "-n",
            "shop",
        ],
        &[],
        &["get", "secret", "s2", "-n", "shop"],
    );
    assert_eq!(tls["type"], "kubernetes.io/tls");
    assert_eq!(b64(&tls["data"]["tls.crt"]), std::fs::read(&crt).unwrap());
    assert_eq!(b64(&tls["data"]["tls.key"]), std::fs::read(&key).unwrap());
    let docker = create(
        &h,
        &[
            "secret",
            "docker-registry",
            "s3",
            "--docker-server=r.io",
            "--docker-username=u",
            "--docker-password=p",
            "-n",
            "shop",
        ],
        &[],
        &["get", "secret", "s3", "-n", "shop"],
    );
    assert_eq!(docker["type"], "kubernetes.io/dockerconfigjson");
    let cfg: Value = serde_json::from_slice(&b64(&docker["data"][".dockerconfigjson"])).unwrap();
    assert_eq!(cfg["auths"]["r.io"]["username"], "u");

    let cm = create(
        &h,
        &[
            "configmap",
            "c1",
            "--from-literal=x=y",
            &bin_arg,
            "-n",
            "shop",
        ],
        &[],
        &["get", "configmap", "c1", "-n", "shop"],
    );
    assert_eq!(cm["data"]["x"], "y");
    assert_eq!(b64(&cm["binaryData"]["bin"]), bin);

    // Kinds the server has no built-in resource for are served as CRDs of the same names.
    if !served(&h, "priorityclasses.scheduling.k8s.io") {
        serve_as_crd(
            &h,
            dir.path(),
            "scheduling.k8s.io",
            "priorityclasses",
            "PriorityClass",
            false,
        );
    }
    let pc = create(
        &h,
        &[
            "priorityclass",
            "pc1",
            "--value=1000",
            "--description=x",
            "--preemption-policy=Never",
        ],
        &[],
        &["get", "priorityclasses.scheduling.k8s.io", "pc1"],
    );
    assert_eq!(pc["value"], 1000);
    assert_eq!(pc["preemptionPolicy"], "Never");
    if !served(&h, "ingresses.networking.k8s.io") {
        serve_as_crd(
            &h,
            dir.path(),
            "networking.k8s.io",
            "ingresses",
            "Ingress",
            true,
        );
    }
    let ing = create(
        &h,
        &[
            "ingress",
            "i1",
            "--rule=foo.com/bar=web:80,tls=sec",
            "--class=nginx",
            "-n",
            "shop",
        ],
        &[],
        &["get", "ingresses.networking.k8s.io", "i1", "-n", "shop"],
    );
    let rule = &ing["spec"]["rules"][0];
    assert_eq!(rule["host"], "foo.com");
    assert_eq!(
        rule["http"]["paths"][0]["backend"]["service"]["port"]["number"],
        80
    );
    assert_eq!(ing["spec"]["tls"][0]["secretName"], "sec");
    // ResourceQuota is core/v1, which no CRD can serve: tests/data/protobuf/quota.pb covers it
    // unless the server has it.
    if served(&h, "resourcequotas") {
        let q = create(
            &h,
            &[
                "quota",
                "q1",
                "--hard=pods=10,requests.cpu=500m,requests.memory=1Gi",
                "-n",
                "shop",
            ],
            &[],
            &["get", "resourcequota", "q1", "-n", "shop"],
        );
        assert_eq!(q["spec"]["hard"]["requests.cpu"], "500m");
        assert_eq!(q["spec"]["hard"]["pods"], "10");
    }
}
