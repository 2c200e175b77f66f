#!/usr/bin/env bash
# Deletes the kind clusters of up.sh.
set -euo pipefail
for c in east west; do kind delete cluster --name $c || true; done
rm -rf "${CLUSTERMESH_KIND_DIR:-/tmp/clustermesh-kind}"
