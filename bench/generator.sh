#!/bin/bash
# Times the release build of qrexec-connect-generator as systemd runs it
# (output into a tmpfs dir, like $XDG_RUNTIME_DIR/systemd/generator), on a
# 10,000-line config and on an empty one. A measurement, not a test.
# With hyperfine it also times --check on the big config: parsing and unit
# text without creating any file, i.e. the part that is not kernel work.
#
#   bench/generator.sh [LINES]      (default 10000; needs bash, uses hyperfine
#                                    when installed, else a plain timing loop)
#
# It reads the host's /etc/qrexec-connect/ too if that exists (read only);
# everything it writes is under a temporary directory that it removes.
set -euo pipefail

lines=${1:-10000}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin qrexec-connect-generator
bin=$PWD/target/release/qrexec-connect-generator

base=/dev/shm
[ -d "$base" ] && [ -w "$base" ] || base=${TMPDIR:-/tmp}
work=$(mktemp -d "$base/qrexec-connect-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/big/.config/qrexec-connect" "$work/empty" "$work/runtime"
# Every LISTEN form, all distinct, all valid.
awk -v n="$lines" 'BEGIN {
    for (i = 0; i < n; i++) {
        port = 1024 + i % 60000
        host = "127." int(i / 60000) "." int(i / 250) % 250 "." (i % 250 + 1)
        if (i % 5 == 0)      printf "%s:%d  vm%d  qubes.ConnectTCP+%d\n", host, port, i % 97, port
        else if (i % 5 == 1) printf "[fd00::%x]:%d  @default  qubes.ConnectTCP+%d  # v6\n", i, port, port
        else if (i % 5 == 2) printf "%%t/qrexec-connect/agent-%d  vault  qubes.ConnectSSHAgent\n", i
        else if (i % 5 == 3) printf "/run/qrexec-connect/a-%d  @dispvm  my.Service+x\n", i
        else                 printf "@container-%d  \x27\x27  qubes.ConnectContainer\n", i
    }
}' > "$work/big/.config/qrexec-connect/bindings.conf"

cat > "$work/prepare" <<PREPARE
#!/bin/sh
rm -rf "$work/out" && mkdir "$work/out"
PREPARE
chmod +x "$work/prepare"

export XDG_RUNTIME_DIR=$work/runtime
unset XDG_CONFIG_HOME

# Sanity: the big config gives one unit and one link per line.
HOME=$work/big "$bin" --check >/dev/null
"$work/prepare"; HOME=$work/big "$bin" "$work/out" "$work/out" "$work/out"
units=$(find "$work/out" -maxdepth 1 -name '*.socket' | wc -l)
echo "$lines lines -> $units units (output on $(stat -f -c %T "$work"))"

if command -v hyperfine >/dev/null; then
    hyperfine --shell=none --warmup 3 --runs 30 --prepare "$work/prepare" \
        --command-name "$lines lines" "env HOME=$work/big $bin $work/out $work/out $work/out" \
        --command-name "$lines lines, --check (parse and render, no files)" "env HOME=$work/big $bin --check" \
        --command-name "empty config" "env HOME=$work/empty $bin $work/out $work/out $work/out"
else
    for case in big empty; do
        total=0 best=
        for _ in $(seq 30); do
            "$work/prepare"
            start=$(date +%s%N)
            HOME=$work/$case "$bin" "$work/out" "$work/out" "$work/out"
            took=$(( $(date +%s%N) - start ))
            total=$((total + took))
            if [ -z "$best" ] || [ "$took" -lt "$best" ]; then best=$took; fi
        done
        printf '%s: mean %d.%03d ms, best %d.%03d ms (30 runs)\n' "$case" \
            $((total / 30000000)) $((total / 30000 % 1000)) $((best / 1000000)) $((best / 1000 % 1000))
    done
fi
