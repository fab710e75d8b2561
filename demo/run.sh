#!/usr/bin/env bash
# A live qrexec-connect demo on any Linux machine with systemd installed: no
# Qubes, no root. It follows the path a user takes:
#   1. two config lines (one the policy allows, one it refuses);
#   2. the socket units qrexec-connect-generator writes from them;
#   3. those sockets served by the daemon: systemd-socket-activate stands in
#      for the user manager, passing the sockets and their
#      FileDescriptorName= exactly as the units say, and the qrexec-client-vm
#      test double stands in for qrexec, dom0 policy and the service qube
#      (a web server on a free loopback port);
#   4. a request through each binding, then `qrexec-connect status`, which
#      explains the refused one, and `qrexec-connect policy`. A stand-in
#      `qubesdb-read` gives this qube's name (demo-client), so the status
#      hint and the policy name the same source qube, as they do in Qubes.
# Without a terminal (`make demo | cat`, CI) the output is plain text.
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
    print(f"(connection closed, no answer: {e.__class__.__name__})")
PY
}
# Waits until something listens on the port, without connecting to it (a
# connection would start the daemon and count as a call).
wait_listening() {
    for _ in $(seq 200); do
        [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ] && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}
# Bold headings only on a terminal that has them.
if [ -t 1 ] && [ "${TERM:-dumb}" != dumb ]; then
    step() { printf '\n\033[1m%s\033[0m\n' "$*"; }
else
    step() { printf '\n%s\n' "$*"; }
fi

service_port=$(free_port)
web_port=$(free_port)
deny_port=$(free_port)
mkdir -p "$work/www" "$work/config/qrexec-connect" "$work/run"
chmod 700 "$work/run"
echo "Hello from the web server in the service qube" > "$work/www/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$service_port" >/dev/null 2>&1 &
pids+=($!)
wait_listening "$service_port"

# What dom0 would say: this qube may reach the web server's port, nothing else.
cat > "$work/policy" <<POLICY
qubes.ConnectTCP +$service_port @anyvm web-server allow
qubes.ConnectTCP * @anyvm @anyvm deny
POLICY

# What Qubes' qubesdb-read would say about this qube: its name.
mkdir -p "$work/bin"
cat > "$work/bin/qubesdb-read" <<'QUBESDB'
#!/bin/sh
[ "$1" = /name ] && echo demo-client
QUBESDB
chmod +x "$work/bin/qubesdb-read"

export XDG_CONFIG_HOME="$work/config" XDG_RUNTIME_DIR="$work/run" HOME="$work"
export PATH="$work/bin:$PATH"
# Never the user's own manager: systemctl --user would find it through the
# session bus, and status would compare the demo's config with it.
unset DBUS_SESSION_BUS_ADDRESS
config="$XDG_CONFIG_HOME/qrexec-connect/web.conf"
cat > "$config" <<CONFIG
127.0.0.1:$web_port   web-server  qubes.ConnectTCP+$service_port
127.0.0.1:$deny_port   web-server  qubes.ConnectTCP+22
CONFIG

step "1. The config: ~/.config/qrexec-connect/web.conf"
sed 's/^/    /' "$config"

step "2. The socket unit the generator writes for the first line (qrexec-connect-generator --check --verbose)"
units=$("$bin/qrexec-connect-generator" --check --verbose 2>/dev/null)
awk '/^==> /{n++} n==1' <<<"$units" | sed 's/^/    /'
fdnames=$(sed -n 's/^FileDescriptorName=//p' <<<"$units" | paste -sd:)

step "3. The daemon serves both sockets (systemd-socket-activate plays the user manager)"
systemd-socket-activate \
    --listen="127.0.0.1:$web_port" --listen="127.0.0.1:$deny_port" \
    --fdname="$fdnames" \
    -E QREXEC_DOUBLE_POLICY="$work/policy" -E XDG_RUNTIME_DIR \
    "$bin/qrexec-connect" --qrexec-client-vm="$bin/qrexec-client-vm-double" \
    2>"$work/daemon.log" &
pids+=($!)
wait_listening "$web_port"
wait_listening "$deny_port"
echo "    curl http://127.0.0.1:$web_port/   =>  $(fetch "http://127.0.0.1:$web_port/")"
echo "    curl http://127.0.0.1:$deny_port/   =>  $(fetch "http://127.0.0.1:$deny_port/")"
sleep 0.4 # the daemon publishes its counters within 200 ms of a change

step "4. Why did the second one close? qrexec-connect status"
# The problem "the user manager cannot be asked" (its line and the indented
# lines it wraps onto) is the note below instead.
"$bin/qrexec-connect" status 2>&1 |
    awk '/^problem: the user manager/ { skip = 1; next } skip && /^ / { next } { skip = 0; print }' |
    sed "1{/^$/d}; s/^/    /" || true
echo "    (no user manager runs in this demo, so the state column says unknown)"

step "   ... and the rules dom0 needs: qrexec-connect policy"
# Its standard error repeats the install steps of the comments, and says
# that hand-written units are left out (no user manager to list them).
"$bin/qrexec-connect" policy 2>/dev/null | sed 's/^/    /'

step "The daemon's log"
grep -E "^qrexec-connect" "$work/daemon.log" | sed 's/^/    /' || true

if [ -t 0 ] && [ -z "${CI:-}" ]; then
    echo
    echo "Try it yourself in another terminal:"
    echo "  curl http://127.0.0.1:$web_port/"
    echo "  curl http://127.0.0.1:$deny_port/"
    echo "Press Ctrl-C to stop."
    wait "${pids[-1]}"
fi
