#!/usr/bin/env bash
# Installs everything this repository needs on a fresh Debian 12 machine (run as root).
# Idempotent: safe to run again; each step is skipped when already done.
set -euo pipefail

# chromium: the flow map's browser test (crates/flowmap/tests/browser.rs) renders the page headless.
need_pkgs=(etcd-server etcd-client clang llvm libbpf-dev bpftool iproute2 iputils-ping
           protobuf-compiler libprotobuf-dev iptables nftables procps psmisc prometheus chromium)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian starts etcd and prometheus services on install; our tests start their own etcd on
# random ports and only use prometheus's `promtool`.
for svc in etcd prometheus; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet $svc 2>/dev/null; then
    systemctl stop $svc || true
    systemctl disable $svc >/dev/null 2>&1 || true
  fi
done

# bpffs is not mounted at boot on these machines.
if ! mount | grep -q 'type bpf on /sys/fs/bpf\|on /sys/fs/bpf type bpf'; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# cgroup v2 must be available for the socket-LB datapath.
if ! mount | grep -q 'type cgroup2'; then
  mkdir -p /sys/fs/cgroup/unified
  mount -t cgroup2 none /sys/fs/cgroup/unified
fi

# Python tools in a venv inside the checkout: the Kubernetes API test server validates objects
# against the official schemas of Kubernetes 1.32 that `kubernetes-validate` ships, and the
# test server's conformance suite drives it with the official Python client.
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv"
py_pkgs=(kubernetes-validate==1.37.0 kubernetes==37.0.2 pytest==8.3.5)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import kubernetes_validate, kubernetes, pytest' 2>/dev/null; then
  echo "setup: installing ${py_pkgs[*]} into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${py_pkgs[@]}"
fi

# The IaC scanner for deploy/, in a venv of its own (its pins conflict with the client's).
checkov_venv="$repo/.venv-checkov"
if [ ! -x "$checkov_venv/bin/checkov" ]; then
  echo "setup: installing checkov into $checkov_venv"
  python3 -m venv "$checkov_venv"
  "$checkov_venv/bin/pip" install -q --disable-pip-version-check "checkov==3.2.*"
fi

echo "setup: ok (etcd $(etcd --version 2>/dev/null | head -1 | awk '{print $3}'), clang $(clang --version | head -1 | awk '{print $4}'), protoc $(protoc --version | awk '{print $2}'))"
