#!/usr/bin/env bash
# A live qrexec-connect demo on any Linux machine with systemd installed: no
# Qubes, no root. Pieces:
#   - a web server on a free loopback port plays the "service qube";
#   - the qrexec-client-vm test double plays qrexec + dom0 policy: it allows
#     web-server qubes.ConnectTCP+PORT and refuses everything else;
#   - systemd-socket-activate plays the user manager, passing two listening
#     sockets to qrexec-connect exactly as the generated socket units would
#     for this config:
#         127.0.0.1:WEB   web-server  qubes.ConnectTCP+PORT
#         127.0.0.1:DENY  web-server  qubes.ConnectTCP+22      (policy says no)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/debug}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
fetch() {
    python3 - "$1" <<'PY'
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
except Exception as e:
    print(f"(no answer: {e.__class__.__name__}: {e})")
PY
}
wait_listening() { # port
    for _ in $(seq 200); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2; return 1
}

service_port=$(free_port)
web_port=$(free_port)
deny_port=$(free_port)
mkdir -p "$work/www"
echo "Hello from the web server in the service qube (port $service_port)" > "$work/www/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$service_port" >/dev/null 2>&1 &
pids+=($!)
wait_listening "$service_port"

cat > "$work/policy" <<POLICY
qubes.ConnectTCP +$service_port @anyvm web-server allow
qubes.ConnectTCP * @anyvm @anyvm deny
POLICY

systemd-socket-activate \
    --listen="127.0.0.1:$web_port" --listen="127.0.0.1:$deny_port" \
    --fdname="web-server qubes.ConnectTCP+$service_port:web-server qubes.ConnectTCP+22" \
    -E QREXEC_DOUBLE_POLICY="$work/policy" \
    "$bin/qrexec-connect" --qrexec-client-vm="$bin/qrexec-client-vm-double" &
pids+=($!)
wait_listening "$web_port" # this first connection starts the daemon, as socket activation does

cat <<TEXT

qrexec-connect is listening (log lines start with "qrexec-connect:").

  127.0.0.1:$web_port  ->  web-server qubes.ConnectTCP+$service_port   (allowed)
  127.0.0.1:$deny_port  ->  web-server qubes.ConnectTCP+22     (refused by policy)

Two requests through it (the second is refused by the policy, so the connection just closes):
TEXT
echo "  curl http://127.0.0.1:$web_port/  =>  $(fetch "http://127.0.0.1:$web_port/")"
echo "  curl http://127.0.0.1:$deny_port/  =>  $(fetch "http://127.0.0.1:$deny_port/")"
sleep 0.2 # let the log lines of those two calls print before the prompt
if [ -t 0 ] && [ -z "${CI:-}" ]; then
    echo
    echo "Try it yourself in another terminal:"
    echo "  curl http://127.0.0.1:$web_port/"
    echo "  curl http://127.0.0.1:$deny_port/"
    echo "Press Ctrl-C to stop."
    wait "${pids[-1]}"
fi
