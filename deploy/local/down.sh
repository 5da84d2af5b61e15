#!/usr/bin/env bash
# Stop the cluster started by up.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=runs/local-cluster.json
if [ ! -f "$STATE" ]; then echo "not up"; exit 0; fi
PID=$(python3 -c "import json; print(json.load(open('$STATE'))['pid'])")
kill "$PID" 2>/dev/null || true
for _ in $(seq 1 60); do [ -f "$STATE" ] || { echo "cluster down"; exit 0; }; sleep 1; done
echo "cluster did not stop cleanly; killing" >&2; kill -9 "$PID" 2>/dev/null || true; rm -f "$STATE"
