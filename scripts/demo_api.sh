# Sourced by scripts/demo.sh and scripts/ui.sh: serve the demo's marketing system through the local
# HubSpot-like API (reconcile.demo.hubspot_server) when the demo config reaches it that way
# (`reconcile demo init --api`), on the port its base_url names, with a token generated for this session.
#
# demo_api_start DIR: no-op for a demo without --api; else starts the server in the background, exports
# RECONCILE_DEMO_HUBSPOT_TOKEN for the processes started after it, and sets DEMO_API_PID (the caller stops it).
demo_api_start() {
  local dir="$1" port ready
  DEMO_API_PID=""
  port="$(sed -nE 's#^ *base_url: http://127\.0\.0\.1:([0-9]+).*#\1#p' "$dir/reconcile.yaml" | head -n 1)"
  [[ -n "$port" ]] || return 0
  RECONCILE_DEMO_HUBSPOT_TOKEN="demo-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(12))')"
  export RECONCILE_DEMO_HUBSPOT_TOKEN
  ready="$dir/.hubspot-api.url"
  rm -f "$ready"
  "$BIN/python" -m reconcile.demo.hubspot_server "$dir/systems/marketing.db" --port "$port" \
    --ready-file "$ready" >"$dir/hubspot-api.log" 2>&1 &
  DEMO_API_PID=$!
  for _ in $(seq 1 50); do [[ -s "$ready" ]] && break; sleep 0.1; done
  if [[ ! -s "$ready" ]]; then
    kill "$DEMO_API_PID" 2>/dev/null || true
    printf 'error: the HubSpot-like API did not start on port %s; see %s\n' "$port" "$dir/hubspot-api.log" >&2
    return 1
  fi
  echo "marketing API: $(cat "$ready") (pid $DEMO_API_PID, log $dir/hubspot-api.log)"
}
