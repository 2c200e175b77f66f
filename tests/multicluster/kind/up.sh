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
  d=$work/$c
  rm -rf "$d"
  $cm certs init --cluster-name $c --out "$d/ca"
  # etcd is its own trust domain: a second CA that signs etcd's server certificate and the
  # apiserver's etcd client certificate only (its key never enters the cluster).
  $cm certs init --etcd --cluster-name $c --out "$d/etcd-ca"
  $cm certs issue --ca-dir "$d/etcd-ca" --role etcd --cluster-name $c --cluster-id ${ID[$c]} \
    --dns clustermesh-etcd-0.clustermesh-etcd.kube-system.svc --dns clustermesh-etcd.kube-system.svc --out "$d/etcd-server"
  $cm certs issue --ca-dir "$d/etcd-ca" --role apiserver --cluster-name $c --cluster-id ${ID[$c]} --out "$d/etcd-client"
  node_ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' $c-control-plane)
  $cm certs issue --ca-dir "$d/ca" --role apiserver --cluster-name $c --cluster-id ${ID[$c]} \
    --dns clustermesh-apiserver.kube-system.svc --ip "$node_ip" --out "$d/apiserver"
  # One certificate for every node, naming node "kind": the Mesh API admits a node agent only
  # while a Node of its certificate's name exists (ADR 0020), so these agents are refused until
  # certificates are issued per node (issue 15).
  $cm certs issue --ca-dir "$d/ca" --role node-agent --cluster-name $c --cluster-id ${ID[$c]} --node kind --out "$d/node-agent"
  k="kubectl --context kind-$c -n kube-system"
  $k create secret generic clustermesh-ca --from-file="$d/ca/ca.crt" --from-file="$d/ca/ca.key"
  for s in etcd-server etcd-client; do
    $k create secret generic clustermesh-$s --from-file="$d/$s/tls.crt" --from-file="$d/$s/tls.key" --from-file="$d/$s/ca.crt"
  done
  $k create secret generic clustermesh-apiserver-tls --from-file="$d/apiserver/tls.crt" --from-file="$d/apiserver/tls.key" --from-file="$d/apiserver/ca.crt"
  $k create secret generic clustermesh-node-agent-tls --from-file="$d/node-agent/tls.crt" --from-file="$d/node-agent/tls.key" --from-file="$d/node-agent/ca.crt"
  # This cluster's overlay of deploy/overlays/kind: its name, ID and Mesh API endpoint.
  mkdir -p "$d/overlay"
  cat > "$d/overlay/kustomization.yaml" <<EOT
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [$(realpath --relative-to="$d/overlay" "$PWD/deploy/overlays/kind")]
configMapGenerator:
  - name: clustermesh-config
    namespace: kube-system
    behavior: replace
    literals: [CLUSTER_NAME=$c, CLUSTER_ID=${ID[$c]}, MESH_ENDPOINT=$node_ip:32379]
replacements:
  - source: {kind: ConfigMap, name: clustermesh-config, fieldPath: data.MESH_ENDPOINT}
    targets:
      - select: {kind: Service, name: clustermesh-apiserver}
        fieldPaths: ["metadata.annotations.[clustermesh.dev/mesh-endpoints]"]
EOT
  kubectl --context kind-$c apply -k "$d/overlay"
  $k rollout status statefulset/clustermesh-etcd --timeout=180s
  $k rollout status deployment/clustermesh-apiserver --timeout=180s
  $k rollout status daemonset/clustermesh-node-agent --timeout=180s
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
