#!/usr/bin/env bash
# The main job today: one cluster's control plane, end to end, with real parts.
#   - a cluster CA and certificates from `clustermesh certs`
#   - a real etcd that only accepts clients with a certificate from that CA
#   - the Kubernetes API test server (the only stand-in: no kube-apiserver runs here), driven
#     with the real kubectl
#   - clustermesh-apiserver registering the cluster and exporting a Service that kubectl
#     annotates as global; a malformed annotation becoming a Warning event; withdrawal
#   - what happens to a client without a certificate, and to a conflicting cluster ID
# Everything lives in a temporary directory and is stopped on exit. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --quiet --bins
bin=target/debug
work=$(mktemp -d /tmp/clustermesh-demo.XXXXXX)
pids=()
cleanup() { for ((i=${#pids[@]}-1; i>=0; i--)); do p=${pids[i]}; kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
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

step "the Kubernetes API test server (kubectl is a real client of it)"
$bin/kube-testserver --cluster east --dir "$work/kube" --log warn >"$work/kube.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/kube/kubeconfig" ] && break; sleep 0.1; done
export KUBECONFIG="$work/kube/kubeconfig" HOME="$work"
kubectl create namespace shop
cat >"$work/web.yaml" <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.1.1.10], conditions: {ready: true}, nodeName: node-1, zone: a}
- {addresses: [10.1.1.11], conditions: {ready: true}, nodeName: node-1, zone: a}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.1.1.10, podIPs: [{ip: 10.1.1.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.1.1.11, podIPs: [{ip: 10.1.1.11}]}
YAML
kubectl apply --validate=false -f "$work/web.yaml"

step "clustermesh-apiserver: registers cluster east (ID 1), leads, exports"
hport=$(free_port)
$bin/clustermesh-apiserver --cluster-name east --cluster-id 1 \
  --etcd-endpoints "https://127.0.0.1:$cport" --etcd-tls-dir "$work/apiserver" \
  --kubeconfig "$KUBECONFIG" --replica demo-0 --health-bind "127.0.0.1:$hport" --log warn &
pids+=($!)
http() { python3 -c 'import sys,urllib.request
try: r=urllib.request.urlopen(sys.argv[1], timeout=2); print(r.read().decode(), end="")
except Exception as e: sys.exit(1)' "$1"; }
for _ in $(seq 300); do http "http://127.0.0.1:$hport/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "readyz: $(http "http://127.0.0.1:$hport/readyz")"
etcdget() { ctl --cert "$work/apiserver/tls.crt" --key "$work/apiserver/tls.key" get --prefix "$1" --keys-only | sed '/^$/d'; }
etcdget /clustermesh/v1/clusters/
echo "exported endpoints and identities (the service is not global yet):"
etcdget /clustermesh/v1/state/east/

wait_key() { for _ in $(seq 100); do if etcdget "$1" | grep -q .; then [ "$2" = present ] && return 0; else [ "$2" = absent ] && return 0; fi; sleep 0.1; done; echo "UNEXPECTED: $1 not $2"; exit 1; }
svc=/clustermesh/v1/state/east/services/shop/web

step "kubectl annotate service web service.cilium.io/global=true  →  exported"
kubectl -n shop annotate service web service.cilium.io/global=true service.cilium.io/affinity=local
wait_key "$svc" present
etcdget /clustermesh/v1/state/east/services/

step "a malformed annotation: not exported, a Warning event names it"
kubectl -n shop annotate --overwrite service web service.cilium.io/affinity=sideways
wait_key "$svc" absent
for _ in $(seq 100); do kubectl -n shop get events -o json | grep -q InvalidGlobalServiceAnnotation && break; sleep 0.1; done
kubectl -n shop get events -o json | python3 -c 'import json,sys
for e in json.load(sys.stdin)["items"]: print(e["type"], e["reason"] + ":", e["message"])'
kubectl -n shop annotate --overwrite service web service.cilium.io/affinity=local
wait_key "$svc" present
echo "fixed: exported again"

step "kubectl annotate service web service.cilium.io/global-  →  withdrawn"
kubectl -n shop annotate service web service.cilium.io/global-
wait_key "$svc" absent
echo "withdrawn; metrics:"
http "http://127.0.0.1:$hport/metrics" | grep -E '^clustermesh_(exported_objects|leader|invalid_services_total)'

step "a second apiserver claiming ID 2 for cluster east is refused; the record stays"
if $bin/clustermesh-apiserver --cluster-name east --cluster-id 2 \
  --etcd-endpoints "https://127.0.0.1:$cport" --etcd-tls-dir "$work/apiserver"; then
  echo "UNEXPECTED: accepted"; exit 1
fi

step "done: everything is torn down on exit"
