#!/usr/bin/env bash
# Where a connection's time goes in the daemon, against the floor
# (bench/README.md, "Where the time goes"). Root; run after `make bench` or
# `cargo build --release --bins --example loadgen` (it builds nothing but the
# floor).
#
#   bench/profile.sh TOOL [N]   N connections (default 500), one at a time,
#                               after 20 unrecorded ones; for daemon and floor
#   TOOL: cpu        CPU per connection only (schedstat, as make bench)
#         strace     syscalls per connection (strace -c on the acceptor)
#         perf       perf record -e cpu-clock (software clock: this VM has no
#                    hardware counters) -g, report by syscall and component
#         callgrind  user-space instructions per connection: the run with N
#                    connections minus a run with none, so start-up cancels
#         rss        memory after N connections: VmRSS, RssAnon, RssFile
#                    (/proc/PID/status) and Pss (smaps_rollup) of the acceptor
#
# DAEMON_BIN=PATH measures another build of the daemon (the release profile
# variants in bench/results/issue-19.md, "Where the KiB went").
#
# Each run: a private network namespace (loopback only), the echo server, the
# acceptor under systemd-socket-activate as in `make bench`, then loadgen rtt.
# Output files in target/bench/profile/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REL=$ROOT/target/release
LG=$REL/examples/loadgen
DOUBLE=$REL/qrexec-client-vm-double
FLOOR_BIN=$ROOT/target/bench/floor
OUT=$ROOT/target/bench/profile
DAEMON_BIN=${DAEMON_BIN:-$REL/qrexec-connect}
export DAEMON_BIN
CLIENT_ARGS=(--no-filter-escape-chars-stdout --filter-escape-chars-stderr --use-stdin-socket
    -- '' "qubes.ConnectTCP+9000")

if [ "${1:-}" = --inner ]; then
    # --inner WHO TOOL N
    who=$2 tool=$3 n=$4
    ip link set lo up
    "$LG" serve --port=9000 --lifetime=600 2>/dev/null &
    echo_pid=$!
    "$LG" wait-listen --port=9000
    wrap=()
    tag=$who-$tool-$n
    [ "$tool" = callgrind ] && wrap=(valgrind --tool=callgrind --callgrind-out-file="$OUT/$tag.callgrind")
    case $who in
        daemon) systemd-socket-activate -l 127.0.0.1:9004 --fdname="'' qubes.ConnectTCP+9000" \
            "${wrap[@]}" "$DAEMON_BIN" --qrexec-client-vm="$DOUBLE" --max-connections=2000 \
            2>"$OUT/$tag.log" & ;;
        floor) systemd-socket-activate -l 127.0.0.1:9004 \
            "${wrap[@]}" "$FLOOR_BIN" "$DOUBLE" "${CLIENT_ARGS[@]}" 2>"$OUT/$tag.log" & ;;
    esac
    acceptor=$!
    "$LG" wait-listen --port=9004
    "$LG" rtt --port=9004 --count=20 >/dev/null # starts it, warms it
    watcher=
    case $tool in
        strace) strace -c -o "$OUT/$tag.strace" -p "$acceptor" 2>/dev/null & watcher=$! ;;
        perf) perf record -q --no-inherit -e cpu-clock -F 4000 -g -o "$OUT/$tag.perf" \
            -p "$acceptor" 2>/dev/null & watcher=$! ;;
    esac
    [ -n "$watcher" ] && sleep 1 # attached before the first connection
    if [ "$n" -gt 0 ]; then
        "$LG" rtt --port=9004 --count="$n" --cpu-of="$acceptor" | grep -E '^(cpu_us_per_conn|p50_us)='
    fi
    if [ -n "$watcher" ]; then kill -INT "$watcher" 2>/dev/null || true; wait "$watcher" || true; fi
    if [ "$tool" = rss ]; then
        "$LG" drain --fwd="$acceptor" --exclude="$DOUBLE" --timeout=30 >/dev/null
        sed -n 's/^\(VmRSS\|RssAnon\|RssFile\):\s*/  \1 /p' "/proc/$acceptor/status"
        sed -n 's/^Pss:\s*/  Pss /p' "/proc/$acceptor/smaps_rollup"
        # Rss by mapping: the program, each library, [heap], [stack], anonymous.
        awk '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "" ? "[anon]" : $6); sub(".*/", "", name) }
             /^Rss:/ { rss[name] += $2 }
             END { for (n in rss) if (rss[n] > 0) printf "    %-28s %6d kB\n", n, rss[n] }' \
            "/proc/$acceptor/smaps" | sort -k2 -rn
    fi
    kill "$acceptor" "$echo_pid" 2>/dev/null || true
    wait "$acceptor" 2>/dev/null || true
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "profile: run as root (network namespace)" >&2; exit 1; }
tool=${1:?usage: bench/profile.sh cpu|strace|perf|callgrind|rss [N]}
n=${2:-500}
mkdir -p "$OUT" "$(dirname "$FLOOR_BIN")"
cc -O2 -Wall -Wextra -Werror -o "$FLOOR_BIN" bench/floor.c
for who in floor daemon; do
    echo "== $who, $tool, $n connections"
    unshare --net -- "$0" --inner "$who" "$tool" "$n"
    case $tool in
        strace) awk -v n="$n" '$1 ~ /^[0-9.]+$/ && $NF != "total" {
                printf "  %-16s %5.1f per connection\n", $NF, $4 / n }' \
                "$OUT/$who-strace-$n.strace" | sort -k2 -rn | head -25 ;;
        perf)
            perf report -i "$OUT/$who-perf-$n.perf" --no-children --sort dso -g none 2>/dev/null \
                | grep '%' | head -5
            perf report -i "$OUT/$who-perf-$n.perf" --children --sort sym -g none 2>/dev/null \
                | grep -E '\[k\] (__do_sys_clone3|__do_sys_wait4|__x64_sys_accept4|__x64_sys_epoll_wait|__x64_sys_epoll_ctl|__x64_sys_pidfd_open|ksys_write|__sys_sendmsg|__x64_sys_sendto|__x64_sys_munmap|__x64_sys_close|arch_do_signal_or_restart)$' ;;
        callgrind)
            unshare --net -- "$0" --inner "$who" callgrind 0 >/dev/null
            base=$(sed -n 's/^summary: //p' "$OUT/$who-callgrind-0.callgrind")
            full=$(sed -n 's/^summary: //p' "$OUT/$who-callgrind-$n.callgrind")
            echo "  user-space instructions per connection: $(((full - base) / n))"
            echo "  (by function: callgrind_annotate --inclusive=yes $OUT/$who-callgrind-$n.callgrind)" ;;
    esac
done
