//! What we ship is what we test: every overlay of `deploy/` renders with `kubectl kustomize`,
//! passes the official schemas of three Kubernetes minor releases (strict: no unknown
//! fields), passes the IaC scan (checkov, with the accepted findings listed and justified in
//! `deploy/.checkov.yaml` and `deploy/README.md`), and is accepted whole by the strict
//! Kubernetes API test server through `kubectl apply` with kubectl's default (server-side)
//! validation — and a second apply changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The releases the manifests must be valid for: the three minors before the newest the
/// schemas package ships, the oldest a supported cluster may still run.
const RELEASES: [&str; 3] = ["1.30.0", "1.31.0", "1.32.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn overlays() -> Vec<PathBuf> {
    let dir = repo().join("deploy/overlays");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no overlays under {}", dir.display());
    out
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (run scripts/setup.sh)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn render(overlay: &Path, into: &Path) -> PathBuf {
    let (ok, text) = run(Command::new("kubectl").arg("kustomize").arg(overlay));
    assert!(ok, "kubectl kustomize {}: {text}", overlay.display());
    let name = overlay.file_name().unwrap().to_string_lossy().into_owned();
    let file = into.join(format!("{name}.yaml"));
    std::fs::write(&file, text).unwrap();
    file
}

fn tool(venv: &str, name: &str) -> PathBuf {
    let p = repo().join(venv).join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

#[test]
fn every_overlay_passes_the_official_schemas_of_three_releases() {
    let tmp = tempfile::tempdir().unwrap();
    let validate = tool(".venv", "kubernetes-validate");
    for overlay in overlays() {
        let file = render(&overlay, tmp.path());
        for release in RELEASES {
            let (ok, text) = run(Command::new(&validate)
                .args(["--strict", "--quiet", "-k", release])
                .arg(&file));
            assert!(
                ok,
                "{} against Kubernetes {release}: {text}",
                overlay.display()
            );
        }
    }
}

#[test]
fn every_overlay_passes_the_security_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let checkov = tool(".venv-checkov", "checkov");
    let config = repo().join("deploy/.checkov.yaml");
    for overlay in overlays() {
        let file = render(&overlay, tmp.path());
        let (ok, text) = run(Command::new(&checkov)
            .arg("--config-file")
            .arg(&config)
            .arg("-f")
            .arg(&file)
            .args(["--framework", "kubernetes", "--compact", "--quiet"]));
        assert!(
            ok,
            "checkov on {}: every finding is fixed or accepted in deploy/.checkov.yaml with its reason in deploy/README.md:\n{text}",
            overlay.display()
        );
    }
}

// kubectl runs as a blocking child process: the server needs threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_overlay_is_accepted_whole_by_a_strict_apiserver() {
    let tmp = tempfile::tempdir().unwrap();
    for overlay in overlays() {
        let h = common::start().await;
        let file = render(&overlay, tmp.path());
        let objects = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("kind: "))
            .count();
        let kubectl = |args: &[&str]| {
            let mut c = Command::new("kubectl");
            c.arg("--kubeconfig")
                .arg(h.kubeconfig())
                .arg("--context")
                .arg(h.context())
                .args(args)
                .env("HOME", tmp.path());
            run(&mut c)
        };
        let f = file.to_string_lossy().into_owned();
        // kubectl's default validation: server-side, through the OpenAPI documents.
        let (ok, text) = kubectl(&["apply", "-f", &f]);
        assert!(ok, "kubectl apply {}: {text}", overlay.display());
        let applied = text
            .lines()
            .filter(|l| l.ends_with(" created") || l.ends_with(" configured"))
            .count();
        assert_eq!(applied, objects, "every object of {f} is stored:\n{text}");
        // A second apply writes nothing: no object gets a new resourceVersion. (kubectl may
        // still print `configured` where the schema's patch strategy is `replace` — a
        // PodDisruptionBudget's selector — as it does against a real cluster.)
        let versions = || {
            let (ok, text) = kubectl(&[
                "get",
                "-f",
                &f,
                "-o",
                "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{\"\\n\"}{end}",
            ]);
            assert!(ok, "kubectl get -f: {text}");
            text
        };
        let before = versions();
        assert_eq!(before.lines().count(), objects, "{before}");
        let (ok, text) = kubectl(&["apply", "-f", &f]);
        assert!(ok, "second apply: {text}");
        assert_eq!(
            versions(),
            before,
            "a second apply changes nothing:\n{text}"
        );
        let (ok, text) = kubectl(&["diff", "-f", &f]);
        assert!(ok, "kubectl diff after apply shows no difference:\n{text}");
    }
}
