//! Compiles `bpf/sock_lb.c` with clang (BPF target, BTF) into `$OUT_DIR/sock_lb.o`, which the
//! agent embeds. Fails with a clear message when clang is missing.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../bpf/sock_lb.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("sock_lb.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(|e| {
            format!(
                "cannot run {clang:?} to build the eBPF programs ({e}): install clang, llvm and \
                 libbpf-dev (scripts/setup.sh does: apt-get install clang llvm libbpf-dev) or \
                 point CLANG at a clang that targets bpf"
            )
        })?;
    if !status.success() {
        return Err(format!("{clang} failed to compile {}", src.display()).into());
    }
    Ok(())
}
