#!/usr/bin/env bash
# Bring a local two-node Ray cluster up in the background; prints the RAY_ADDRESS to use.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
STATE=runs/local-cluster.json
mkdir -p runs
if [ -f "$STATE" ]; then echo "already up: $(cat $STATE)"; exit 0; fi
nohup "$PY" -m deploy.local.cluster up --state "$STATE" "$@" > runs/local-cluster.log 2>&1 &
for _ in $(seq 1 120); do
  if [ -f "$STATE" ]; then grep -m1 "cluster up" runs/local-cluster.log; exit 0; fi
  sleep 1
done
echo "cluster did not come up; see runs/local-cluster.log" >&2
exit 1
