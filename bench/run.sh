#!/usr/bin/env bash
# The benchmark of qrexec-connect against the other ways of starting one
# qrexec-client-vm per connection (bench/README.md). Run as root: `make bench`.
#
#   BENCH_ROUNDS=N   rounds (default 3); each round runs every contender once,
#                    in a rotated order
#   BENCH_QUICK=1    a smoke run: 1 round, smaller counts (figures not comparable
#                    with a full run)
#   BENCH_PARTS=connections|scaling   only the contenders' run, or only the
#                    scaling run (bench/scaling.sh); default both
#
# Everything runs inside a private network namespace (only its loopback
# exists: nothing can leave the machine, and no port of the host is used) and
# a private mount namespace (a tmpfs on /run for the user manager of the
# accept-yes contender). Every process started here lives in that network
# namespace and is killed by pid on exit, whatever the exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DOUBLE=$ROOT/target/release/qrexec-client-vm-double
DAEMON=$ROOT/target/release/qrexec-connect
LG=$ROOT/target/release/examples/loadgen
FLOOR_BIN=$ROOT/target/bench/floor
MANAGER_LOCK=/tmp/qrexec-connect-test-user-manager.lock
RESULTS=$ROOT/bench/results
# A smoke run's figures are not comparable with a full run's: kept out of
# the committed results.
[ "${BENCH_QUICK:-0}" = 1 ] && RESULTS=$ROOT/target/bench/results-quick

if [ "${1:-}" != --inner ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bench: run as root (it needs a private network and mount namespace and a" \
             "systemd user manager inside them)" >&2
        exit 1
    fi
    missing=()
    command -v socat >/dev/null || missing+=(socat)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    command -v python3 >/dev/null || missing+=(python3)
    command -v flock >/dev/null || missing+=(util-linux)
    command -v unshare >/dev/null || missing+=(util-linux)
    { command -v systemd-socket-activate >/dev/null && [ -x /usr/lib/systemd/systemd ]; } \
        || missing+=(systemd)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "bench: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            || { echo "bench: could not install ${missing[*]}; install them and retry" >&2; exit 1; }
    fi
    echo "bench: building (cargo build --release)" >&2
    cargo build --release --locked --workspace --bins --example loadgen
    mkdir -p "$(dirname "$FLOOR_BIN")"
    cc -O2 -Wall -Wextra -Werror -o "$FLOOR_BIN" bench/floor.c
    mkdir -p "$RESULTS"
    if [ "${BENCH_PARTS:-all}" != scaling ]; then
        # The accept-yes contender runs a user manager: one at a time on the
        # machine, like the test suite's (the lock its real-manager tests
        # take); a test's cleanup running beside it killed it once.
        echo "bench: waiting for the user-manager lock ($MANAGER_LOCK)" >&2
        flock "$MANAGER_LOCK" unshare --mount --net --propagation private -- "$0" --inner
    fi
    # The scaling run needs its own namespace (the installed tree on /usr,
    # journald) and the machine's one user-manager lock.
    if [ "${BENCH_PARTS:-all}" != connections ]; then
        BENCH_SKIP_BUILD=1 "$ROOT/bench/scaling.sh" "$RESULTS/latest-scaling.md"
        if [ "${BENCH_PARTS:-all}" = all ]; then
            { echo; cat "$RESULTS/latest-scaling.md"; } >>"$RESULTS/latest.md"
        fi
    fi
    exit 0
fi

# ------------------------------------------------------------------ inside
ROUNDS=${BENCH_ROUNDS:-3}
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    ROUNDS=${BENCH_ROUNDS:-1}
    WARMUP_N=200 WARM_N=300 BULK_BYTES=$((256 << 20)) BULK_REPS=1 WARM_CHUNKS=2 HOLD_N=200 RATE_SECS=3 BURST_N=200 COLD_N=2
else
    WARMUP_N=1000 WARM_N=2000 BULK_BYTES=$((1 << 30)) BULK_REPS=3 WARM_CHUNKS=4 HOLD_N=1000 RATE_SECS=10 BURST_N=200 COLD_N=5
fi
RATE_CONC=50
ECHO_PORT=9000
CONTENDERS=(direct floor socket-activate socat accept-yes qrexec-connect qrexec-connect-pipe)
# BENCH_BASELINE=PATH: another build of the daemon (say, of the previous
# commit) as one more contender, `baseline`, run exactly like qrexec-connect
# in the same rounds: before/after figures taken side by side.
BASELINE=${BENCH_BASELINE:-}
[ -n "$BASELINE" ] && CONTENDERS+=(baseline)
FLOOR=floor
# The client's arguments as qrexec-connect passes them in its stdin-socket
# mode: the floor runs the same client the same way.
CLIENT_ARGS=(--no-filter-escape-chars-stdout --filter-escape-chars-stderr --use-stdin-socket
    -- '' "qubes.ConnectTCP+$ECHO_PORT")

WORK=/run/qrexec-connect-bench   # on the namespace's own tmpfs: gone with it
RAW=$WORK/raw.tsv
# shellcheck source=bench/netns.sh
. bench/netns.sh # (the working directory is the repository)
MANAGER=
FWD=
FWD_ARGS=()
declare -A STARTED=()

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    set +e
    trap - EXIT INT TERM
    local pid
    for pid in "${!STARTED[@]}"; do kill "$pid" 2>/dev/null; done
    if [ -n "$MANAGER" ] && kill -0 "$MANAGER" 2>/dev/null; then
        kill "$MANAGER"
        for _ in $(seq 50); do kill -0 "$MANAGER" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MANAGER" 2>/dev/null
    fi
    # Whatever is left in this network namespace was started by this script
    # (doubles, socat children, loadgen): end each by its pid.
    sweep_namespace "${WATCHDOG:-}"
    [ "${#STARTED[@]}" -gt 0 ] && wait "${!STARTED[@]}" 2>/dev/null
    umount /run 2>/dev/null
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

start_watchdog

ip link set lo up
# 1,000 live connections: the load tool, the echo server and the manager each
# hold one descriptor per connection. Raise the limit as far as allowed.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi
if [ "$(ulimit -n)" -lt $((2 * 1000 + 100)) ]; then
    echo "bench: ulimit -n is $(ulimit -n); the 1,000-connection test needs more" >&2
    exit 1
fi
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system /run/systemd/user /run/user/0 "$WORK/home"
chmod 700 /run/user/0
export XDG_RUNTIME_DIR=/run/user/0 HOME=$WORK/home
: >"$RAW"

# --------------------------------------------------------------- helpers
start_bg() { # start_bg LOG COMMAND...: run in the background, remember its pid
    local logfile=$1; shift
    "$@" >>"$logfile" 2>&1 &
    STARTED[$!]=1
    BG=$!
}

stop_pid() {
    local pid=$1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "STARTED[$pid]"
}

sctl() { systemctl --user --no-pager "$@"; }

record() { printf '%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" >>"$RAW"; }

kv() { sed -n "s/^$1=//p" <<<"$2" | head -n1; }

# measure CONTENDER TEST LOADGEN-ARGS...: runs loadgen; on failure logs it
# and returns 1 (the run goes on, the figure is missing from the report).
measure() {
    local contender=$1 test=$2; shift 2
    if ! OUT=$("$LG" "$@" 2>"$WORK/loadgen.err"); then
        log "  $contender $test FAILED: $(tail -n3 "$WORK/loadgen.err" | tr '\n' ' ')"
        record "$contender" "failed_$test" 1
        return 1
    fi
    local errors
    errors=$(kv errors "$OUT")
    [ -n "$errors" ] && record "$contender" "errors_$test" "$errors"
    return 0
}

# The forwarder's processes for loadgen: the pid, less the doubles; for the
# pipe mode, plus the splicers qrexec-connect forks away from the daemon.
fwd_args() {
    FWD_ARGS=()
    [ -z "$FWD" ] && return 0
    FWD_ARGS=(--fwd="$FWD" --exclude="$DOUBLE")
    [ "$1" = qrexec-connect-pipe ] && FWD_ARGS+=(--also-comm=qrexec-splice)
    return 0
}

drain() {
    [ -z "$FWD" ] && return 0
    "$LG" drain --fwd="$FWD" --exclude="$DOUBLE" --timeout=60 >/dev/null \
        || log "  drain: $(cat "$WORK/loadgen.err" 2>/dev/null)"
}

# --------------------------------------------------------- the contenders
port_of() {
    case $1 in
        direct) echo $ECHO_PORT ;;
        socket-activate) echo 9001 ;;
        socat) echo 9002 ;;
        accept-yes) echo 9003 ;;
        qrexec-connect) echo 9004 ;;
        qrexec-connect-pipe) echo 9005 ;;
        qrexec-connect-nodir) echo 9007 ;;
        baseline) echo 9008 ;;
        baseline-nodir) echo 9009 ;;
        floor) echo 9006 ;;
    esac
}

start_fwd() {
    local c=$1 port
    port=$(port_of "$c")
    PORT=$port
    case $c in
        direct) FWD= ;;
        floor)
            # Started like qrexec-connect: the first connection execs it.
            start_bg "$WORK/$c.log" systemd-socket-activate -l "127.0.0.1:$port" \
                "$FLOOR_BIN" "$DOUBLE" "${CLIENT_ARGS[@]}"
            FWD=$BG ;;
        socket-activate)
            start_bg "$WORK/$c.log" systemd-socket-activate --accept --inetd -l "127.0.0.1:$port" \
                "$DOUBLE" '' "qubes.ConnectTCP+$ECHO_PORT"
            FWD=$BG ;;
        socat)
            # socat's EXEC splits on spaces and has no quoting for an empty
            # argument: @default is the same target for the double.
            start_bg "$WORK/$c.log" socat "TCP-LISTEN:$port,reuseaddr,fork" \
                "EXEC:$DOUBLE @default qubes.ConnectTCP+$ECHO_PORT"
            FWD=$BG ;;
        accept-yes)
            sctl start bench-accept.socket || log "  could not start bench-accept.socket"
            FWD=$MANAGER ;;
        qrexec-connect-nodir | baseline-nodir)
            # Cold starts only: no runtime directory, so every start probes
            # the client's --help (run by hand, or a unit without one).
            local daemon=$DAEMON
            [ "$c" = baseline-nodir ] && daemon=$BASELINE
            start_bg "$WORK/$c.log" systemd-socket-activate -l "127.0.0.1:$port" \
                --fdname="'' qubes.ConnectTCP+$ECHO_PORT" \
                "$daemon" --qrexec-client-vm="$DOUBLE" --max-connections=2000
            FWD=$BG ;;
        qrexec-connect | qrexec-connect-pipe | baseline)
            # A runtime directory of its own, as under the user manager: the
            # first start probes the client, later ones (every applied config
            # change restarts the daemon) remember its mode; counters for
            # `status` are published there too. One per contender: the double
            # answers --help by QREXEC_DOUBLE_VERSION, a real client by build.
            local run_dir="$WORK/run-$c"
            mkdir -p -m 0700 "$run_dir"
            local env=(-E "XDG_RUNTIME_DIR=$run_dir")
            [ "$c" = qrexec-connect-pipe ] && env+=(-E QREXEC_DOUBLE_VERSION=old)
            local daemon=$DAEMON
            [ "$c" = baseline ] && daemon=$BASELINE
            start_bg "$WORK/$c.log" systemd-socket-activate -l "127.0.0.1:$port" \
                --fdname="'' qubes.ConnectTCP+$ECHO_PORT" "${env[@]}" \
                "$daemon" --qrexec-client-vm="$DOUBLE" --max-connections=2000
            FWD=$BG ;;
    esac
    fwd_args "$c"
    "$LG" wait-listen --port="$port" --timeout=10
}

stop_fwd() {
    local c=$1
    drain
    case $c in
        direct) ;;
        accept-yes) sctl stop bench-accept.socket || log "  could not stop bench-accept.socket (manager gone?)" ;;
        *) stop_pid "$FWD" ;;
    esac
    FWD=
}

# The Qubes documentation's forwarder: a socket unit with Accept=yes and a
# template service running qrexec-client-vm with the connection as stdin and
# stdout.
write_accept_units() {
    cat >/run/systemd/user/bench-accept.socket <<EOF
[Unit]
Description=bench: qrexec-client-vm per connection, Accept=yes (the Qubes docs' way)

[Socket]
ListenStream=127.0.0.1:$(port_of accept-yes)
Accept=yes
# Not in the docs' example: the defaults (64 connections; 200 activations per
# 2 s, then the socket is stopped) would end the 1,000-connection and rate tests.
MaxConnections=2000
TriggerLimitIntervalSec=0
EOF
    cat >/run/systemd/user/bench-accept@.service <<EOF
[Unit]
Description=bench: one connection through qrexec-client-vm

[Service]
ExecStart=$DOUBLE '' qubes.ConnectTCP+$ECHO_PORT
StandardInput=socket
StandardOutput=inherit
EOF
}

start_manager() {
    write_accept_units
    # Logs to a file rather than the host's kernel log.
    start_bg "$WORK/manager.log" env -i PATH=/usr/bin:/bin HOME="$HOME" USER=root \
        XDG_RUNTIME_DIR="$XDG_RUNTIME_DIR" SYSTEMD_LOG_TARGET=console \
        /usr/lib/systemd/systemd --user
    MANAGER=$BG
    local state
    for _ in $(seq 200); do
        state=$(sctl is-system-running 2>/dev/null || true)
        case $state in running | degraded) return 0 ;; esac
        sleep 0.1
    done
    log "the user manager did not start (state: ${state:-none}); see $WORK/manager.log"
    tail -n 20 "$WORK/manager.log" >&2
    return 1
}

# ---------------------------------------------------------------- a round
# All forwarders listen side by side during a round, and each test runs over
# every contender before the next test starts (in an order rotated from round
# to round): the machine is shared and its speed drifts, so figures that are
# compared are taken close together in time.
declare -A FWD_OF=() PORT_OF=()

start_all() {
    local c
    for c in "${CONTENDERS[@]}"; do
        start_fwd "$c" || log "  $c did not start listening; its figures will be missing"
        FWD_OF[$c]=$FWD
        PORT_OF[$c]=$PORT
        # Warm-up: starts the qrexec-connect daemon, fills caches.
        "$LG" rtt --port="$PORT" --count=20 >/dev/null 2>&1 || true
        drain
    done
}

use() {
    FWD=${FWD_OF[$1]}
    PORT=${PORT_OF[$1]}
    fwd_args "$1"
}

stop_all() {
    local c
    for c in "${CONTENDERS[@]}"; do
        use "$c"
        stop_fwd "$c"
    done
}

run_round() {
    local n=${#CONTENDERS[@]} order=() c i k dir chunk
    for ((k = 0; k < n; k++)); do order+=("${CONTENDERS[$(((k + ROUND - 1) % n))]}"); done
    log "round $ROUND: ${order[*]}"
    start_all

    log "  warm: $WARM_N sequential connections each, in $WARM_CHUNKS interleaved chunks"
    chunk=$((WARM_N / WARM_CHUNKS))
    for ((k = 0; k < WARM_CHUNKS; k++)); do
        for c in "${order[@]}"; do
            use "$c"
            local cpu=()
            [ -n "$FWD" ] && cpu=(--cpu-of="$FWD")
            if measure "$c" warm rtt --port="$PORT" --count="$chunk" --out="$WORK/warm-$ROUND-$c" "${cpu[@]}" \
                && [ -n "$FWD" ]; then
                record "$c" cpu_us_per_conn "$(kv cpu_us_per_conn "$OUT")"
            fi
            drain
        done
    done
    for c in "${order[@]}"; do
        if OUT=$("$LG" percentiles --file="$WORK/warm-$ROUND-$c" 2>/dev/null); then
            record "$c" warm_p50_us "$(kv p50_us "$OUT")"
            record "$c" warm_p99_us "$(kv p99_us "$OUT")"
        fi
    done

    log "  bulk: $BULK_REPS x $((BULK_BYTES >> 20)) MiB up and down each"
    for ((i = 0; i < BULK_REPS; i++)); do
        for dir in up down; do
            for c in "${order[@]}"; do
                use "$c"
                if measure "$c" "$dir" "$dir" --port="$PORT" --bytes="$BULK_BYTES" "${FWD_ARGS[@]}"; then
                    record "$c" "${dir}_mib_s" "$(kv mib_s "$OUT")"
                    if [ -n "$FWD" ]; then
                        record "$c" "${dir}_cpu_s_per_gib" "$(kv fwd_cpu_s_per_gib "$OUT")"
                        record "$c" "${dir}_chain_cpu_s_per_gib" "$(kv chain_cpu_s_per_gib "$OUT")"
                    fi
                fi
                drain
            done
        done
    done

    log "  memory: idle, then $HOLD_N live connections"
    for c in "${order[@]}"; do
        use "$c"
        if [ -n "$FWD" ] && measure "$c" idle rss "${FWD_ARGS[@]}"; then
            record "$c" idle_rss_kib "$(kv rss_kib "$OUT")"
        fi
    done
    for c in "${order[@]}"; do
        use "$c"
        if measure "$c" hold hold --port="$PORT" --count="$HOLD_N" "${FWD_ARGS[@]}"; then
            record "$c" hold_open_s "$(kv open_s "$OUT")"
            if [ -n "$FWD" ]; then
                record "$c" rss1000_kib "$(kv rss_kib "$OUT")"
                record "$c" pss1000_kib "$(kv pss_kib "$OUT")"
                record "$c" root_rss1000_kib "$(kv root_rss_kib "$OUT")"
                # What each connection costs outside the main process: the
                # pipe mode's splicers, socat's children.
                record "$c" child_pss_per_conn_kib \
                    "$(awk -v a="$(kv pss_kib "$OUT")" -v b="$(kv root_pss_kib "$OUT")" -v n="$HOLD_N" \
                        'BEGIN { printf "%.1f", (a - b) / n }')"
                record "$c" hold_live_doubles "$(kv live_doubles "$OUT")"
            fi
        fi
        drain
    done

    log "  rate: $RATE_CONC clients for $RATE_SECS s each"
    for c in "${order[@]}"; do
        use "$c"
        if measure "$c" rate rate --port="$PORT" --concurrency=$RATE_CONC --seconds="$RATE_SECS"; then
            record "$c" rate_per_s "$(kv per_s "$OUT")"
        fi
        drain
    done

    log "  burst: $BURST_N simultaneous connections each"
    for c in "${order[@]}"; do
        use "$c"
        if measure "$c" burst burst --port="$PORT" --count=$BURST_N; then
            record "$c" burst_ms "$(kv all_ms "$OUT")"
        fi
        drain
    done
    stop_all

    # Cold: the first connection after the forwarder (re)starts listening.
    log "  cold: $COLD_N starts each"
    for ((i = 0; i < COLD_N; i++)); do
        for c in "${order[@]}"; do
            if start_fwd "$c" && measure "$c" cold rtt --port="$PORT" --count=1; then
                record "$c" cold_us "$(kv p50_us "$OUT")"
            fi
            stop_fwd "$c"
            # Right after it: the same daemon without a runtime directory.
            if [ "$c" = qrexec-connect ] || [ "$c" = baseline ]; then
                c=$c-nodir
                if start_fwd "$c" && measure "$c" cold rtt --port="$PORT" --count=1; then
                    record "$c" cold_us "$(kv p50_us "$OUT")"
                fi
                stop_fwd "$c"
            fi
        done
    done
}

# ------------------------------------------------------------------- main
START=$(date +%s)
log "bench: $ROUNDS round(s); warm $WARM_N, bulk $BULK_REPS x $((BULK_BYTES >> 20)) MiB," \
    "hold $HOLD_N, rate ${RATE_SECS}s x $RATE_CONC, burst $BURST_N, cold x$COLD_N per round"
start_bg "$WORK/echo.log" "$LG" serve --port=$ECHO_PORT --lifetime=$((1200 + ROUNDS * 600))
ECHO=$BG
"$LG" wait-listen --port=$ECHO_PORT
start_manager

# Warm-up, not recorded: the first seconds of load on this kind of machine
# (a VM whose idle vCPUs sleep) are slower than the rest.
log "warm-up"
ROUND=0
start_fwd floor
"$LG" rtt --port="$PORT" --count="$WARMUP_N" >/dev/null
"$LG" down --port="$PORT" --bytes="$BULK_BYTES" >/dev/null
"$LG" up --port="$PORT" --bytes="$BULK_BYTES" >/dev/null
stop_fwd floor

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    run_round
done
ELAPSED=$(($(date +%s) - START))

# ----------------------------------------------------------------- report
REPORT=$WORK/latest.md
{
    echo "# qrexec-connect benchmark results"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "$ROUNDS round(s) in ${ELAPSED} s$([ "${BENCH_QUICK:-0}" = 1 ] && echo ', QUICK mode (not comparable)')."
    echo "Machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1))," \
        "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r);" \
        "$(systemctl --version | head -n1), $(socat -V 2>/dev/null | sed -n 's/^socat version \([^ ]*\).*/socat \1/p')."
    echo "Per round and contender: $WARM_N sequential connections (warm), $BULK_REPS x $((BULK_BYTES >> 20)) MiB up and down," \
        "$HOLD_N live connections, ${RATE_SECS} s of $RATE_CONC concurrent clients, a burst of $BURST_N, $COLD_N cold starts."
    echo
    echo "Cells: median (min–max over rounds; cold: over all cold starts) ×ratio to the median of $FLOOR."
    echo "See bench/README.md for what each column counts."
    echo
    "$LG" report --raw="$RAW" --floor="$FLOOR" --order="$(IFS=,; echo "${CONTENDERS[*]},qrexec-connect-nodir${BASELINE:+,baseline-nodir}")" \
        --daemons=qrexec-connect,qrexec-connect-pipe:pipe${BASELINE:+,baseline} --hold="$HOLD_N"
    failed=$(awk -F'\t' '$3 ~ /^failed_/ {print $2 " " substr($3, 8) " (round " $1 ")"}' "$RAW" | paste -sd, -)
    [ -n "$failed" ] && echo && echo "Failed measurements: $failed."
    live=$(awk -F'\t' -v n="$HOLD_N" '$3 == "hold_live_doubles" && $4 != n {print $2 " " $4 " (round " $1 ")"}' "$RAW" | paste -sd, -)
    [ -n "$live" ] && echo && echo "Live doubles seen during the hold test differ from $HOLD_N: $live."
} >"$REPORT"
# The picture: every warm latency of every round, per contender.
# `direct` (no forwarder, a tenth of the others) is left out: it would
# stretch the axis and squeeze the curves that are compared.
curves=()
for c in "${CONTENDERS[@]}"; do
    [ "$c" = direct ] && continue
    cat "$WORK"/warm-*-"$c" >"$WORK/cdf-$c" 2>/dev/null || true
    [ -s "$WORK/cdf-$c" ] && curves+=("$c=$WORK/cdf-$c")
done
direct_p50=$(awk -F'\t' '$2 == "direct" && $3 == "warm_p50_us" {printf "%.2f", $4 / 1000; exit}' "$RAW")
python3 "$ROOT/bench/cdf.py" --out="$WORK/latest-cdf.svg" --reference="$FLOOR" \
    --note="direct (no forwarder) not drawn: p50 ${direct_p50:-n/a} ms" \
    --title="Warm connection latency, $ROUNDS round(s)$([ "${BENCH_QUICK:-0}" = 1 ] && echo ', QUICK mode')" \
    "${curves[@]}"
echo >>"$REPORT"
echo "![latency CDF per contender](latest-cdf.svg)" >>"$REPORT"
cp "$REPORT" "$RESULTS/latest.md"
cp "$RAW" "$RESULTS/latest-raw.tsv"
cp "$WORK/latest-cdf.svg" "$RESULTS/latest-cdf.svg"
echo
cat "$REPORT"
log "saved latest.md, latest-raw.tsv and latest-cdf.svg in ${RESULTS#"$ROOT"/} (${ELAPSED} s)"
