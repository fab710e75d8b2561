# Sourced by bench/run.sh and bench/scaling.sh, which each run in a private
# network namespace of their own: everything in that namespace was started
# by the script, so it can be ended by pid without a list of what was started.

NETNS=$(readlink /proc/$$/ns/net)

# Kills every process in this network namespace but this script and the
# pids given as arguments.
sweep_namespace() {
    local dir pid spare
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [ "$pid" = $$ ] && continue
        for spare in "$@"; do [ "$pid" = "$spare" ] && continue 2; done
        [ "$(readlink "$dir/ns/net" 2>/dev/null)" = "$NETNS" ] && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

# Should the script be killed outright (no trap runs), a watchdog outside its
# process group ends everything in the namespace once the script is gone.
# Sets WATCHDOG to its pid.
start_watchdog() {
    local main=$$
    setsid bash -c '
        while kill -0 '"$main"' 2>/dev/null; do sleep 1; done
        for dir in /proc/[0-9]*; do
            pid=${dir#/proc/}
            [ "$pid" = $$ ] && continue
            [ "$(readlink "$dir/ns/net" 2>/dev/null)" = "'"$NETNS"'" ] && kill -KILL "$pid" 2>/dev/null
        done' </dev/null >/dev/null 2>&1 &
    WATCHDOG=$!
}
