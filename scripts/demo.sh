#!/usr/bin/env bash
# The main job today: one cluster's control-plane foundation, end to end, with real parts.
#   - a cluster CA and certificates from `clustermesh certs`
#   - a real etcd that only accepts clients with a certificate from that CA
#   - clustermesh-apiserver registering the cluster in etcd
#   - what happens to a client without a certificate, and to a conflicting cluster ID
# Everything lives in a temporary directory and is stopped on exit. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --quiet --bins
bin=target/debug
work=$(mktemp -d /tmp/clustermesh-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "cluster CA and certificates (clustermesh certs)"
$bin/clustermesh certs init --cluster-name east --out "$work/ca"
$bin/clustermesh certs issue --ca-dir "$work/ca" --role etcd --cluster-name east --cluster-id 1 \
  --ip 127.0.0.1 --dns localhost --out "$work/etcd"
$bin/clustermesh certs issue --ca-dir "$work/ca" --role apiserver --cluster-name east --cluster-id 1 \
  --ip 127.0.0.1 --out "$work/apiserver"
$bin/clustermesh certs status "$work/etcd" "$work/apiserver"

step "etcd with client-certificate authentication"
cport=$(free_port); pport=$(free_port)
etcd --name demo --data-dir "$work/etcd-data" \
  --listen-client-urls "https://127.0.0.1:$cport" --advertise-client-urls "https://127.0.0.1:$cport" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "demo=http://127.0.0.1:$pport" \
  --cert-file "$work/etcd/tls.crt" --key-file "$work/etcd/tls.key" \
  --trusted-ca-file "$work/etcd/ca.crt" --client-cert-auth --logger zap --log-level error \
  >"$work/etcd.log" 2>&1 &
pids+=($!)
ctl() { ETCDCTL_API=3 etcdctl --endpoints "https://127.0.0.1:$cport" --cacert "$work/ca/ca.crt" "$@"; }
for _ in $(seq 100); do ctl --cert "$work/apiserver/tls.crt" --key "$work/apiserver/tls.key" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
echo "etcd is up on 127.0.0.1:$cport"

step "a client without a certificate is refused"
if ctl --command-timeout=2s get / >/dev/null 2>&1; then echo "UNEXPECTED: accepted"; exit 1; else echo "refused, as it should be"; fi

step "clustermesh-apiserver registers cluster east (ID 1)"
$bin/clustermesh-apiserver --cluster-name east --cluster-id 1 \
  --etcd-endpoints "https://127.0.0.1:$cport" --etcd-tls-dir "$work/apiserver" &
pids+=($!)
for _ in $(seq 100); do ctl --cert "$work/apiserver/tls.crt" --key "$work/apiserver/tls.key" get /clustermesh/v1/clusters/east --keys-only 2>/dev/null | grep -q east && break; sleep 0.1; done
ctl --cert "$work/apiserver/tls.crt" --key "$work/apiserver/tls.key" get --prefix /clustermesh/v1/clusters/ --keys-only

step "a second apiserver claiming ID 2 for cluster east is refused; the record stays"
if $bin/clustermesh-apiserver --cluster-name east --cluster-id 2 \
  --etcd-endpoints "https://127.0.0.1:$cport" --etcd-tls-dir "$work/apiserver"; then
  echo "UNEXPECTED: accepted"; exit 1
fi

step "done: everything is torn down on exit"
