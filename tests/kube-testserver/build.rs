//! Compiles the `generated.proto` files of Kubernetes 1.32 into one `FileDescriptorSet`
//! (`$OUT_DIR/k8s-1.32.fds`) that `src/protobuf.rs` decodes protobuf request bodies with.
//!
//! The `.proto` files are data shipped by the crates.io package `k8s-rs-pb` (its
//! `src/v1_32/**/generated.proto`, the upstream files of k8s.io/api, apimachinery,
//! apiextensions-apiserver, kube-aggregator and metrics at 1.32, with the `k8s.io.` package
//! prefix removed). It is a build-dependency so that cargo fetches and unpacks it; no feature
//! is enabled, so none of its generated Rust is compiled. Cargo tells a build script nothing
//! about where a dependency's sources are, so they are looked up in cargo's registry cache
//! (`$CARGO_HOME/registry/src/*/k8s-rs-pb-<version>`), or taken from
//! `KUBE_TESTSERVER_K8S_PROTOS` (the `src/v1_32` directory, e.g. of a vendored copy).
//!
//! Needs `protoc` (Debian: protobuf-compiler; installed by `scripts/setup.sh`), or `PROTOC`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The package directory of the pinned `k8s-rs-pb` (Cargo.toml pins `=0.5.0`).
const PACKAGE: &str = "k8s-rs-pb-0.5.0";
/// The Kubernetes version whose protos are compiled.
const VERSION_DIR: &str = "src/v1_32";
const OVERRIDE: &str = "KUBE_TESTSERVER_K8S_PROTOS";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={OVERRIDE}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let root = proto_root()?;
    let mut files = Vec::new();
    collect(&root, &root, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(format!("no .proto files under {}", root.display()).into());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?)
        .join("k8s-1.32.fds");
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    let output = Command::new(&protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg("-I")
        .arg(&root)
        .args(&files)
        .output()
        .map_err(|e| {
            format!(
                "running {}: {e} (install protobuf-compiler, as scripts/setup.sh does, or set PROTOC)",
                protoc.to_string_lossy()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "protoc failed on the Kubernetes protos in {}: {}",
            root.display(),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}

/// The `src/v1_32` directory of the unpacked `k8s-rs-pb` package.
fn proto_root() -> Result<PathBuf, String> {
    let usable = |p: &Path| p.join("api/core/v1/generated.proto").is_file();
    if let Some(dir) = std::env::var_os(OVERRIDE) {
        let p = PathBuf::from(dir);
        return if usable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "{OVERRIDE}={} has no api/core/v1/generated.proto",
                p.display()
            ))
        };
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registry = home.join("registry").join("src");
    let entries =
        std::fs::read_dir(&registry).map_err(|e| format!("reading {}: {e}", registry.display()))?;
    for entry in entries.flatten() {
        let p = entry.path().join(PACKAGE).join(VERSION_DIR);
        if usable(&p) {
            return Ok(p);
        }
    }
    Err(format!(
        "{PACKAGE}/{VERSION_DIR} not found under {}: it is a build-dependency, so cargo unpacks it \
         there; with vendored sources point {OVERRIDE} at its {VERSION_DIR}",
        registry.display()
    ))
}

/// The `.proto` files under `dir`, relative to `root`.
fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            let rel = path
                .strip_prefix(root)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            out.push(rel.to_path_buf());
        }
    }
    Ok(())
}
