//! The installed `kubectl` binary as a real client of the test server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kube_testserver::Handle;
use serde_json::Value;

/// Runs kubectl against the server; returns (success, stdout, stderr).
fn kubectl(h: &Handle, args: &[&str]) -> (bool, String, String) {
    kubectl_ctx(h, h.context(), args)
}

fn kubectl_ctx(h: &Handle, ctx: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(h.kubeconfig())
        .args(["--context", ctx, "--request-timeout", "20s"])
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

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels:
    app: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    protocol: TCP
"#;

const SERVICE_V2: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels:
    app: web
    tier: front
  annotations:
    service.cilium.io/global: "true"
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    protocol: TCP
  - name: https
    port: 443
    protocol: TCP
"#;

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["10.1.0.5"]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: a
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_apply_annotate_label_get_delete() {
    let h = common::start().await;
    let dir = tempfile::tempdir().unwrap();

    // Discovery-driven commands.
    let v = ok(&h, &["version", "-o", "json"]);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert!(
        v["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap()
            .starts_with("v1.")
    );
    let res = ok(&h, &["api-resources", "-o", "name"]);
    for r in [
        "services",
        "endpointslices.discovery.k8s.io",
        "leases.coordination.k8s.io",
        "namespaces",
    ] {
        assert!(
            res.lines().any(|l| l == r),
            "{r} missing from api-resources:\n{res}"
        );
    }

    // create
    ok(&h, &["create", "namespace", "shop"]);
    ok(
        &h,
        &[
            "create",
            "--validate=false",
            "-f",
            &write(dir.path(), "svc.yaml", SERVICE),
        ],
    );
    let (success, _, err) = kubectl(
        &h,
        &[
            "create",
            "--validate=false",
            "-f",
            &write(dir.path(), "svc.yaml", SERVICE),
        ],
    );
    assert!(!success);
    assert!(
        err.contains("AlreadyExists") || err.contains("already exists"),
        "{err}"
    );
    ok(
        &h,
        &[
            "create",
            "--validate=false",
            "-f",
            &write(dir.path(), "slice.yaml", SLICE),
        ],
    );
    ok(
        &h,
        &[
            "-n",
            "shop",
            "create",
            "configmap",
            "cfg",
            "--from-literal=k=v",
        ],
    );

    // get -o json
    let svc = json(&h, &["-n", "shop", "get", "service", "web"]);
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert!(svc["spec"]["clusterIP"].as_str().unwrap().contains('.'));
    let slice = json(&h, &["-n", "shop", "get", "endpointslices", "web-abc"]);
    assert_eq!(slice["endpoints"][0]["addresses"][0], "10.1.0.5");
    // Default (table) output names the object.
    let table = ok(&h, &["-n", "shop", "get", "services"]);
    assert!(table.lines().any(|l| l.starts_with("web ")), "{table}");
    let list = json(&h, &["get", "services", "-A", "-l", "app=web"]);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // apply: first apply over a created object, then a changed manifest (strategic merge).
    let f2 = write(dir.path(), "svc2.yaml", SERVICE_V2);
    ok(&h, &["apply", "--validate=false", "-f", &f2]);
    let svc = json(&h, &["-n", "shop", "get", "service", "web"]);
    assert_eq!(svc["metadata"]["labels"]["tier"], "front");
    assert_eq!(
        svc["metadata"]["annotations"]["service.cilium.io/global"],
        "true"
    );
    assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 2);
    // apply of the original manifest removes what the last apply added.
    let f1 = write(dir.path(), "svc1.yaml", SERVICE);
    ok(&h, &["apply", "--validate=false", "-f", &f1]);
    let svc = json(&h, &["-n", "shop", "get", "service", "web"]);
    assert!(svc["metadata"]["labels"].get("tier").is_none(), "{svc}");
    assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 1, "{svc}");
    // apply creates what does not exist.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied, namespace: shop}\ndata: {a: b}\n";
    ok(
        &h,
        &[
            "apply",
            "--validate=false",
            "-f",
            &write(dir.path(), "cm.yaml", cm),
        ],
    );
    assert_eq!(
        json(&h, &["-n", "shop", "get", "cm", "applied"])["data"]["a"],
        "b"
    );

    // annotate / label (and their removal with a trailing dash).
    ok(
        &h,
        &[
            "-n",
            "shop",
            "annotate",
            "service",
            "web",
            "service.cilium.io/affinity=local",
        ],
    );
    ok(&h, &["-n", "shop", "label", "service", "web", "mesh=yes"]);
    let svc = json(&h, &["-n", "shop", "get", "service", "web"]);
    assert_eq!(
        svc["metadata"]["annotations"]["service.cilium.io/affinity"],
        "local"
    );
    assert_eq!(svc["metadata"]["labels"]["mesh"], "yes");
    let (success, _, err) = kubectl(
        &h,
        &[
            "-n",
            "shop",
            "annotate",
            "service",
            "web",
            "service.cilium.io/affinity=remote",
        ],
    );
    assert!(
        !success,
        "annotate without --overwrite must refuse to change a value"
    );
    assert!(err.contains("overwrite"), "{err}");
    ok(
        &h,
        &[
            "-n",
            "shop",
            "annotate",
            "--overwrite",
            "service",
            "web",
            "service.cilium.io/affinity=remote",
        ],
    );
    ok(
        &h,
        &[
            "-n",
            "shop",
            "annotate",
            "service",
            "web",
            "service.cilium.io/affinity-",
        ],
    );
    ok(&h, &["-n", "shop", "label", "service", "web", "mesh-"]);
    let svc = json(&h, &["-n", "shop", "get", "service", "web"]);
    assert!(
        svc["metadata"]["annotations"]
            .get("service.cilium.io/affinity")
            .is_none()
    );
    assert!(svc["metadata"]["labels"].get("mesh").is_none());

    // The client-certificate context works too.
    let (success, out, err) = kubectl_ctx(
        &h,
        &format!("{}-cert", h.context()),
        &["-n", "shop", "get", "cm", "cfg", "-o", "json"],
    );
    assert!(success, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["data"]["k"],
        "v"
    );

    // delete
    ok(&h, &["-n", "shop", "delete", "service", "web"]);
    let (success, _, err) = kubectl(&h, &["-n", "shop", "get", "service", "web"]);
    assert!(!success);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    // Deleting the namespace takes its objects with it.
    ok(&h, &["delete", "namespace", "shop"]);
    let (success, _, _) = kubectl(&h, &["-n", "shop", "get", "cm", "cfg"]);
    assert!(!success);
}

/// Kills the child on drop, so a failing test leaves no kubectl behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_streams_changes() {
    let h = common::start().await;
    ok(&h, &["create", "namespace", "watched"]);
    let mut child = Reaped(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(h.kubeconfig())
            .args([
                "--context",
                h.context(),
                "-n",
                "watched",
                "get",
                "configmaps",
                "-w",
                "--output-watch-events",
                "-o",
                "json",
            ])
            .env("HOME", h.kubeconfig().parent().unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<(String, String, String)>();
    std::thread::spawn(move || {
        let reader = BufReader::new(stdout);
        let mut buf = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { return };
            buf.push_str(&line);
            buf.push('\n');
            if let Ok(v) = serde_json::from_str::<Value>(&buf) {
                buf.clear();
                let kind = v["type"].as_str().unwrap_or_default().to_owned();
                let name = v["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let val = v["object"]["data"]["k"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                // The namespace's own objects (the root-CA publisher's ConfigMap) are not
                // the test's.
                if name == "kube-root-ca.crt" {
                    continue;
                }
                if tx.send((kind, name, val)).is_err() {
                    return;
                }
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("kubectl get -w printed nothing in time")
    };

    // The watch is up once it shows an object that exists.
    ok(
        &h,
        &[
            "-n",
            "watched",
            "create",
            "configmap",
            "first",
            "--from-literal=k=1",
        ],
    );
    assert_eq!(next(), ("ADDED".into(), "first".into(), "1".into()));
    ok(
        &h,
        &[
            "-n",
            "watched",
            "create",
            "configmap",
            "second",
            "--from-literal=k=2",
        ],
    );
    assert_eq!(next(), ("ADDED".into(), "second".into(), "2".into()));
    ok(
        &h,
        &[
            "-n",
            "watched",
            "patch",
            "configmap",
            "first",
            "--type=merge",
            "-p",
            r#"{"data":{"k":"3"}}"#,
        ],
    );
    assert_eq!(next(), ("MODIFIED".into(), "first".into(), "3".into()));
    ok(&h, &["-n", "watched", "delete", "configmap", "second"]);
    assert_eq!(next(), ("DELETED".into(), "second".into(), "2".into()));
    // Objects in another namespace are not part of this watch.
    ok(
        &h,
        &["create", "configmap", "elsewhere", "--from-literal=k=x"],
    );
    ok(
        &h,
        &[
            "-n",
            "watched",
            "create",
            "configmap",
            "third",
            "--from-literal=k=4",
        ],
    );
    assert_eq!(next(), ("ADDED".into(), "third".into(), "4".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_status_errors() {
    let h = common::start().await;
    // A wrong token is refused with 401.
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(h.kubeconfig())
        .args([
            "--context",
            h.context(),
            "--token",
            "not-the-token",
            "get",
            "namespaces",
        ])
        .env("HOME", h.kubeconfig().parent().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unauthorized") || err.contains("credentials"),
        "{err}"
    );
    // An injected 500 is shown as the server's error (discovery is cached by the first get, so
    // the failure hits the get itself).
    json(&h, &["get", "namespace", "default"]);
    h.fail_next(1, 500);
    let (success, _, err) = kubectl(&h, &["get", "namespace", "default"]);
    assert!(!success);
    assert!(
        err.contains("InternalError") || err.contains("internal error"),
        "{err}"
    );
    // And the next request is fine again.
    assert_eq!(
        json(&h, &["get", "namespace", "default"])["metadata"]["name"],
        "default"
    );
}
