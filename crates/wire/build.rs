//! Generates Rust types from `proto/`. Needs `protoc` (Debian: protobuf-compiler; installed by
//! `scripts/setup.sh`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        return Err(
            "protoc not found: install it with `apt-get install protobuf-compiler` \
                    (scripts/setup.sh does) or point PROTOC at it"
                .into(),
        );
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/clustermesh/v1/model.proto",
                "proto/clustermesh/v1/mesh.proto",
                "proto/clustermesh/v1/flow.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(bin))
            .find(|p| p.is_file())
    })
}
