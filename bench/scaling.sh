#!/usr/bin/env bash
# Cost as bindings grow, on a real systemd user manager (bench/README.md,
# "Scaling"). For each size (1, 50, 400 config lines by default), with the
# project installed as a package would install it:
#
#   - systemd's own `systemctl --user daemon-reload` time (generator included),
#   - reload-to-answer: from that daemon-reload (one line added to the config)
#     until the new binding answers an echo through the double,
#   - `qrexec-connect reconcile` alone, with nothing to do,
#   - and, to show where a no-op reconcile spends its time, the systemctl
#     calls it makes, each timed on its own.
#
#   bench/scaling.sh [RESULT.md]     (root; run by `make bench`, or alone)
#   BENCH_SCALING_SIZES="1 50 400"   sizes (config lines)
#   BENCH_SCALING_REPS=5             adds (and no-op reconciles) per size
#   BENCH_QUICK=1                    2 of each
#
# Everything runs in a private mount and network namespace (a tmpfs on /run,
# the installed tree overlaid on /usr, only a loopback); every process it
# starts is killed by pid on exit. One user manager at a time on the machine:
# it takes the lock the test suite's real-manager tests take (on this
# cgroup-v1 machine two managers would create the same unit cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LG=$ROOT/target/release/examples/loadgen
INSTALL=$ROOT/target/bench/install
LOCK=/tmp/qrexec-connect-test-user-manager.lock

if [ "${1:-}" != --inner ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "scaling: run as root (private namespaces, a user manager inside them)" >&2
        exit 1
    fi
    results=$ROOT/bench/results
    [ "${BENCH_QUICK:-0}" = 1 ] && results=$ROOT/target/bench/results-quick
    OUT=$(realpath -m "${1:-$results/latest-scaling.md}")
    mkdir -p "$(dirname "$OUT")"
    if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
        cargo build --release --locked --bins --example loadgen
    fi
    # The files a package installs, into a tree overlaid on /usr inside the
    # namespace; the double stands where Qubes puts qrexec-client-vm.
    rm -rf "$INSTALL"
    make -s install-client-files DESTDIR="$INSTALL" PREFIX=/usr PROFILE=release >/dev/null
    mkdir -p "$INSTALL/usr/lib/systemd/user/paths.target.wants"
    ln -sf ../qrexec-connect-reconcile.path "$INSTALL/usr/lib/systemd/user/paths.target.wants/"
    cp "$ROOT/target/release/qrexec-client-vm-double" "$INSTALL/usr/bin/qrexec-client-vm"
    echo "scaling: waiting for the user-manager lock ($LOCK)" >&2
    export SCALING_OUT=$OUT
    exec flock "$LOCK" unshare --mount --net --propagation private -- "$0" --inner
fi

# ------------------------------------------------------------------ inside
SIZES=${BENCH_SCALING_SIZES:-1 50 400}
if [ "${BENCH_QUICK:-0}" = 1 ]; then REPS=${BENCH_SCALING_REPS:-2}; else REPS=${BENCH_SCALING_REPS:-5}; fi
ECHO_PORT=9000
FIRST_PORT=20000
WORK=/run/qrexec-connect-scaling
RUNTIME=/run/user/0
RAW=$WORK/raw.tsv
declare -A KEEP=()

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# shellcheck source=bench/netns.sh
. bench/netns.sh # (the working directory is the repository)
# Everything in this network namespace but this script and what KEEP names
# was started here: end each by its pid.
sweep() { sweep_namespace "${!KEEP[@]}"; }
cleanup() {
    set +e
    trap - EXIT INT TERM
    disown -a # no "Killed" line for each background job
    KEEP=()
    sweep
    wait 2>/dev/null
    umount /usr /run 2>/dev/null
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

start_watchdog
KEEP[$WATCHDOG]=1

ip link set lo up
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system /run/systemd/user "$RUNTIME" "$WORK"
chmod 700 "$RUNTIME"
mount -t overlay overlay -o "lowerdir=$INSTALL/usr:/usr" /usr
: >"$RAW"

"$LG" serve --port=$ECHO_PORT --lifetime=3600 >>"$WORK/echo.log" 2>&1 &
KEEP[$!]=1
"$LG" wait-listen --port=$ECHO_PORT
/usr/lib/systemd/systemd-journald >/dev/null 2>&1 &
KEEP[$!]=1
for _ in $(seq 200); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done

# ---------------------------------------------------------------- helpers
HOME_DIR=
session() { # a command with the user session's environment
    env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME="$HOME_DIR" USER=root LANG=C.UTF-8 \
        XDG_RUNTIME_DIR="$RUNTIME" "$@"
}
sctl() { session systemctl --user --no-pager "$@"; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RAW"; }
now_us() { local t=${EPOCHREALTIME/./}; echo "$t"; }
ms_since() { awk -v a="$1" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
line() { echo "127.0.0.1:$1 @default qubes.ConnectTCP+$ECHO_PORT"; }

# Waits until the reconcile step of the last reload is over: the flag gone
# and the oneshot not running.
settle() {
    local state
    for _ in $(seq 400); do
        state=$(sctl show -p ActiveState --value qrexec-connect-reconcile.service)
        if [ ! -e "$RUNTIME/qrexec-connect/reload-requested" ] \
            && { [ "$state" = inactive ] || [ "$state" = failed ]; }; then
            return 0
        fi
        sleep 0.05
    done
    log "reconcile did not settle (state $state)"
    return 1
}

start_manager() {
    session systemd-cat --identifier=systemd-user /usr/lib/systemd/systemd --user \
        >/dev/null 2>&1 &
    MANAGER=$!
    local state
    for _ in $(seq 400); do
        state=$(sctl is-system-running 2>/dev/null || true)
        case $state in running | degraded) return 0 ;; esac
        sleep 0.05
    done
    log "the user manager did not start (state: ${state:-none})"
    return 1
}

# ------------------------------------------------------------ one size
measure_size() {
    local n=$1 i port config t0 took
    HOME_DIR=$WORK/home-$n
    config=$HOME_DIR/.config/qrexec-connect/bench.conf
    mkdir -p "$(dirname "$config")"
    : >"$config"
    for ((i = 0; i < n; i++)); do line $((FIRST_PORT + i)) >>"$config"; done
    start_manager
    "$LG" wait-answer --port=$((FIRST_PORT + n - 1)) --timeout=60 >/dev/null
    settle
    log "  $n binding(s): $REPS adds"
    for ((i = 0; i < REPS; i++)); do
        port=$((FIRST_PORT + n + i))
        line "$port" >>"$config"
        t0=$(now_us)
        sctl daemon-reload
        record "$n" daemon_reload_ms "$(ms_since "$t0")"
        "$LG" wait-answer --port="$port" --timeout=60 >/dev/null
        record "$n" reload_to_answer_ms "$(ms_since "$t0")"
        settle
    done
    # Reconcile with nothing to do: its own time, then the calls it makes.
    local units
    units=$(sctl list-units --all --plain --no-legend --full --type=socket 'qrexec-connect-*.socket' \
        | awk '{print $1}' | tr '\n' ' ')
    for ((i = 0; i < REPS; i++)); do
        t0=$(now_us)
        session /usr/bin/qrexec-connect reconcile --runtime-dir="$RUNTIME" >"$WORK/reconcile.out" 2>&1
        record "$n" noop_reconcile_ms "$(ms_since "$t0")"
        if [ -s "$WORK/reconcile.out" ]; then
            log "  no-op reconcile said: $(head -c 300 "$WORK/reconcile.out")"
        fi
        t0=$(now_us)
        sctl list-units --all --plain --no-legend --full --type=socket 'qrexec-connect-*.socket' >/dev/null
        record "$n" call_list_units_ms "$(ms_since "$t0")"
        t0=$(now_us)
        # shellcheck disable=SC2086 # one argument per unit
        sctl show -p Id -p LoadState -p ActiveState -p Listen -p FileDescriptorName -- $units >/dev/null
        record "$n" call_show_units_ms "$(ms_since "$t0")"
        t0=$(now_us)
        sctl show -p Wants --value sockets.target >/dev/null
        record "$n" call_show_target_ms "$(ms_since "$t0")"
        t0=$(now_us)
        sctl show -p ActiveState --value qrexec-connect.service >/dev/null
        record "$n" call_show_daemon_ms "$(ms_since "$t0")"
    done
    # Each call to systemctl on its own: the floor of one call.
    for ((i = 0; i < REPS; i++)); do
        t0=$(now_us)
        sctl --version >/dev/null
        record "$n" exec_systemctl_ms "$(ms_since "$t0")"
    done
    kill "$MANAGER" 2>/dev/null || true
    # The daemon and any double were the manager's: gone with the sweep.
    sweep
    wait "$MANAGER" 2>/dev/null || true
}

START=$(date +%s)
log "scaling: sizes $SIZES, $REPS adds and no-op reconciles each"
for n in $SIZES; do
    measure_size "$n"
done

median() { # median of the values of METRIC for size N
    awk -F'\t' -v n="$1" -v m="$2" '$1 == n && $2 == m {print $3}' "$RAW" | sort -g \
        | awk '{v[NR] = $1} END {
            if (NR == 0) { print "n/a"; exit }
            if (NR % 2) printf "%.0f", v[(NR + 1) / 2]; else printf "%.0f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
range() {
    awk -F'\t' -v n="$1" -v m="$2" '$1 == n && $2 == m {print $3}' "$RAW" | sort -g \
        | awk 'NR == 1 {lo = $1} {hi = $1} END { if (NR > 1) printf " (%.0f–%.0f)", lo, hi }'
}
cell() { echo "$(median "$1" "$2")$(range "$1" "$2")"; }

REPORT=$WORK/scaling.md
{
    echo "### Scaling: bindings on a real user manager"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $REPS adds and $REPS no-op reconciles per size," \
        "in $(($(date +%s) - START)) s$([ "${BENCH_QUICK:-0}" = 1 ] && echo ', QUICK mode')." \
        "Milliseconds: median (min–max). With journald; generator, units and daemon as installed."
    echo
    echo "| bindings | systemd daemon-reload | reload to new binding answering | answer − reload | no-op reconcile |"
    echo "|---|---|---|---|---|"
    for n in $SIZES; do
        r=$(median "$n" daemon_reload_ms) a=$(median "$n" reload_to_answer_ms)
        echo "| $n | $(cell "$n" daemon_reload_ms) | $(cell "$n" reload_to_answer_ms) |" \
            "$([ "$r" != n/a ] && [ "$a" != n/a ] && echo $((a - r)) || echo n/a) | $(cell "$n" noop_reconcile_ms) |"
    done
    echo
    echo "The systemctl calls of reconcile, each timed alone: a no-op makes only list-units; show of every socket is what it made before it read the generator's record (and is still made for hand-written units)."
    echo
    echo "| bindings | list-units | show (Listen, names, states of every socket) | show sockets.target | show daemon | systemctl --version (exec alone) |"
    echo "|---|---|---|---|---|---|"
    for n in $SIZES; do
        echo "| $n | $(cell "$n" call_list_units_ms) | $(cell "$n" call_show_units_ms) |" \
            "$(cell "$n" call_show_target_ms) | $(cell "$n" call_show_daemon_ms) | $(cell "$n" exec_systemctl_ms) |"
    done
    big=$(echo "$SIZES" | tr ' ' '\n' | sort -n | tail -n1)
    r=$(median "$big" daemon_reload_ms) a=$(median "$big" reload_to_answer_ms) c=$(median "$big" noop_reconcile_ms)
    echo
    echo "Targets at $big bindings (medians; reported, not asserted):"
    echo
    echo "| target | figure | met |"
    echo "|---|---|---|"
    if [ "$c" != n/a ]; then
        echo "| no-op reconcile ≤ 100 ms | $c ms | $([ "$c" -le 100 ] && echo yes || echo '**no**') |"
    fi
    if [ "$r" != n/a ] && [ "$a" != n/a ]; then
        echo "| reload-to-answer ≤ systemd's reload + 300 ms | $a vs $r + 300 ms | $([ "$a" -le $((r + 300)) ] && echo yes || echo '**no**') |"
    fi
} >"$REPORT"
cp "$REPORT" "$SCALING_OUT"
cp "$RAW" "${SCALING_OUT%.md}-raw.tsv"
cat "$REPORT"
