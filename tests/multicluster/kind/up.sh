#!/usr/bin/env bash
# The kind path: two kind clusters (east, west) with the mesh installed, pod routes between
# them, ready for `clustermesh connect` and the scenarios (tests/kind.rs). Needs Docker, kind,
# kubectl and a Rust toolchain; run from anywhere. THIS CANNOT RUN IN THIS REPOSITORY'S CI
# (no Docker engine there); the emulated lab (scripts/demo.sh) is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/../../.."
image=clustermesh:dev
work=${CLUSTERMESH_KIND_DIR:-/tmp/clustermesh-kind}
declare -A ID=([east]=1 [west]=2) POD=([east]=10.1.0.0/16 [west]=10.2.0.0/16) SVC=([east]=10.96.0.0/16 [west]=10.97.0.0/16)
for t in docker kind kubectl; do command -v $t >/dev/null || { echo "error: $t is required" >&2; exit 1; }; done
cargo build --release --locked -p clustermesh-cli
cm=$PWD/target/release/clustermesh
docker build -t $image -f deploy/Dockerfile .
mkdir -p "$work"
for c in east west; do
  cat > "$work/$c.yaml" <<EOT
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking: {podSubnet: "${POD[$c]}", serviceSubnet: "${SVC[$c]}"}
nodes: [{role: control-plane}, {role: worker}]
EOT
  kind create cluster --name $c --config "$work/$c.yaml"
  kind load docker-image $image --name $c
  node_ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' $c-control-plane)
  # Certificates into Secrets, deploy/base with this cluster's parameters, readiness: what a
  # user runs. Node agents enroll for their own node's certificate (ADR 0022).
  $cm install --context kind-$c --cluster-name $c --cluster-id ${ID[$c]} \
    --service-type node-port --mesh-endpoint "$node_ip:32379" --image $image --timeout 180s
done
# Pod IPs must be routable between clusters (as for Cilium's cluster mesh): routes on every
# node of one cluster to the other cluster's pod CIDRs, through that cluster's nodes.
for c in east west; do
  for other in east west; do
    [ $c = $other ] && continue
    for node in $(kind get nodes --name $c); do
      for onode in $(kind get nodes --name $other); do
        cidr=$(kubectl --context kind-$other get node $onode -o jsonpath='{.spec.podCIDR}')
        ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' $onode)
        docker exec $node ip route replace $cidr via $ip
      done
    done
  done
done
echo "kind clusters up: contexts kind-east, kind-west. Next:"
echo "  $cm connect --context kind-east --destination-context kind-west --wait"
echo "  CLUSTERMESH_KIND=1 cargo test -p multicluster --test kind -- --ignored"
