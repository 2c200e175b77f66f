#!/usr/bin/env bash
# The main job: two clusters, east and west, joined into one mesh, a global service, and a
# failover drill measured from a client pod. Run as root on a fresh machine:
#
#   ./scripts/demo.sh          bring the lab up, connect, deploy, drill; the lab stays up
#   ./scripts/demo.sh down     tear everything down (processes, namespaces, bridge, cgroups, pins)
#
# Everything is real except the Kubernetes API (the test server; kubectl is a real client of
# it). Each cluster is installed as a user installs one, with `clustermesh install` from deploy/,
# and a lab kubelet runs the pods it asks for: etcd with mTLS, two clustermesh-apiserver
# replicas (exporter, Mesh API, importer), a node agent on each of two nodes (network
# namespaces) programming eBPF socket load balancing for the node's pods (network namespaces on
# one bridge, processes in their node's
# cgroup). The lab lives in $CLUSTERMESH_DEMO_DIR (default /tmp/clustermesh-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${CLUSTERMESH_DEMO_DIR:-/tmp/clustermesh-demo}
bin=$PWD/target/debug
lab="$bin/clustermesh-lab"

if [ "${1:-}" = down ]; then
  if [ -f "$dir/lab.json" ]; then "$lab" down --dir "$dir"; else echo "no lab in $dir"; fi
  rm -rf "$dir"
  exit 0
fi

bash scripts/setup.sh
cargo build --quiet --workspace --bins --locked
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$'; printf ' %q' "$@"; printf '\n'; "$@"; }

if [ -f "$dir/lab.json" ]; then
  step "a lab from an earlier run is up in $dir: tearing it down first"
  "$lab" down --dir "$dir"
fi
rm -rf "$dir"

step "two emulated clusters, each installed with clustermesh install: etcd, 2 apiserver replicas, 2 nodes with node agents"
"$lab" up --dir "$dir" --clusters east:1,west:2 --nodes 2
export KUBECONFIG=$dir/kubeconfig
run kubectl config get-contexts

step "join them: clustermesh connect (endpoints, CAs and client certificates through each Kubernetes API)"
run "$bin/clustermesh" connect --context east --destination-context west --wait
run "$bin/clustermesh" status --wait --timeout 60s --context east --context west

step "a service in both clusters, made global with kubectl annotate"
"$lab" deploy --dir "$dir" --cluster east --service demo/echo --replicas 2
"$lab" deploy --dir "$dir" --cluster west --service demo/echo --replicas 2
run kubectl --context east -n demo annotate service echo service.cilium.io/global=true service.cilium.io/affinity=local
run kubectl --context west -n demo annotate service echo service.cilium.io/global=true
"$lab" pod --dir "$dir" --cluster east --node east-node-1 --pod default/client
vip=$(kubectl --context east -n demo get service echo -o jsonpath='{.spec.clusterIP}')

step "a client pod on east-node-1 connects to the ClusterIP $vip:80 (affinity local: east's backends)"
for _ in $(seq 100); do
  tally=$("$lab" connect --dir "$dir" --cluster east --pod client --target "$vip:80" --count 20)
  if [[ $tally == *@east* && $tally != *failed* && $tally != *@west* ]]; then break; fi
  sleep 0.2
done
echo "20 connections: $tally"
run "$bin/clustermesh" services --context east
run "$bin/clustermesh" services --context east --node east-node-1

step "failover drill: east's backends are killed, the client fails over to west, then they come back"
flags=$("$lab" drill-flags --dir "$dir" --cluster east --pod client)
# shellcheck disable=SC2086
run "$bin/clustermesh" drill --context east --service demo/echo $flags --method command \
  --down-cmd "$lab backends --dir $dir --cluster east --service demo/echo stop" \
  --up-cmd "$lab backends --dir $dir --cluster east --service demo/echo start" \
  --max-failover 1s --max-recover 5s

step "the same drill through the control plane: endpoints marked not ready in east's Kubernetes API"
# shellcheck disable=SC2086
run "$bin/clustermesh" drill --context east --service demo/echo $flags --method not-ready

step "the flows of the drills: the client's connections that failed over to west (tier 1), seen at east"
run "$bin/clustermesh" observe --context east --pod default/client --to-cluster west --last 6
run "$bin/clustermesh" map --context east --context west --since 10m --output "$dir/map.html"

cat <<EOT

== The lab is still up. Explore it:
  export KUBECONFIG=$dir/kubeconfig
  kubectl --context west -n demo get services,endpointslices
  $bin/clustermesh status --context east --context west
  $bin/clustermesh services --context west --node west-node-1
  $bin/clustermesh observe --context east --context west --follow
  open $dir/map.html (the cross-cluster service map; any browser, offline)
  $lab connect --dir $dir --cluster east --pod client --target $vip:80 --count 20
  logs: $dir/<cluster>/*.log
Tear it down with: ./scripts/demo.sh down
EOT
