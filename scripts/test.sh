#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, then runs every test of the
# workspace against real etcd with mTLS. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The lab's scenarios run the workspace's binaries (clustermesh, clustermesh-apiserver,
# node-agent, kube-testserver, clustermesh-lab) as processes: build them first.
cargo build --workspace --bins --locked
# Two cores: one test binary at a time, its tests in parallel.
cargo test --workspace --locked "$@"
