#!/usr/bin/env bash
# Long reliability runs that CI does not do (docs/RELIABILITY.md has the figures).
#
#   scripts/soak.sh serve [MINUTES]        one serving node through back-to-back runs for
#                                          MINUTES (default 10), its memory (VmRSS) and open
#                                          file descriptors sampled after every run; fails on
#                                          an upward trend. Loopback only.
#   scripts/soak.sh chaos [ROUNDS] [TASKS] the chaos test (tests/tests/chaos.rs) ROUNDS times
#                                          (default 5) with TASKS tasks (default 5000) and a
#                                          new fault schedule (seed) each round. Needs root
#                                          (network namespaces).
#   scripts/soak.sh fuzz [SECONDS]         every fuzz target for SECONDS each (default 600):
#                                          needs cargo-fuzz and a nightly toolchain.
#   scripts/soak.sh all                    all three with their defaults.
#
# Everything it starts is stopped by PID on exit; nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*"; }

serve_soak() {
  local minutes=${1:-10}
  cargo build --release -q -p node-cli --bin p2p-node
  local bin="$PWD/target/release/p2p-node"
  local dir
  dir=$(mktemp -d)
  SOAK_DIR=$dir
  trap 'if [ -n "${SOAK_PID:-}" ]; then kill "$SOAK_PID" 2>/dev/null; wait "$SOAK_PID" 2>/dev/null; fi; rm -rf "${SOAK_DIR:-/nonexistent}"' EXIT
  seq 1 200 | sed 's/^/a/' | tr '\n' ' ' > "$dir/tasks.txt"
  "$bin" serve --types a --capacity 8 --listen 127.0.0.1:0 --discovery none \
    >"$dir/serve.out" 2>"$dir/serve.err" &
  SOAK_PID=$!
  local pid=$SOAK_PID
  local addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/^listening on //p' "$dir/serve.out" | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "serve did not start"; cat "$dir/serve.err"; exit 1; }
  log "serve soak: node $pid on $addr for $minutes min; 200-task runs back to back"
  local end=$(( $(date +%s) + minutes * 60 )) runs=0 failed=0
  : > "$dir/samples"
  while [ "$(date +%s)" -lt "$end" ]; do
    if ! (cd "$dir" && "$bin" run tasks.txt --order none --peer "$addr" --quiet >/dev/null 2>&1); then
      failed=$((failed + 1))
    fi
    runs=$((runs + 1))
    local rss fds
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    echo "$runs $(( $(date +%s) - end + minutes * 60 )) $rss $fds" >> "$dir/samples"
  done
  kill -0 "$pid" 2>/dev/null || { echo "the serving node died"; cat "$dir/serve.err"; exit 1; }
  log "serve soak: $runs runs ($failed failed); samples (run, second, VmRSS kB, fds):"
  # About 20 samples, evenly spaced, and the last.
  awk -v n="$runs" 'NR == 1 || NR % int(n / 20 + 1) == 0 || NR == n' "$dir/samples"
  # Trend: the mean of the last quarter against the mean of the second quarter (the first
  # quarter holds the warm-up: allocator arenas, lazily created runtime threads).
  awk -v n="$runs" -v failed="$failed" '
    { r[NR] = $3; f[NR] = $4 }
    END {
      q = int(n / 4); if (q < 1) { print "too few runs for a trend"; exit 0 }
      for (i = q + 1; i <= 2 * q; i++) { r2 += r[i]; f2 += f[i] }
      for (i = n - q + 1; i <= n; i++) { r4 += r[i]; f4 += f[i] }
      r2 /= q; r4 /= q; f2 /= q; f4 /= q
      printf "VmRSS mean: second quarter %.0f kB, last quarter %.0f kB (%+.1f%%)\n", r2, r4, 100 * (r4 - r2) / r2
      printf "open fds mean: second quarter %.1f, last quarter %.1f\n", f2, f4
      bad = (r4 > r2 * 1.10) || (f4 > f2 + 1) || failed > 0
      if (bad) { print "FAIL: upward trend or failed runs"; exit 1 } else print "OK: no upward trend"
    }' "$dir/samples"
}

chaos_soak() {
  local rounds=${1:-5} tasks=${2:-5000}
  [ "$(id -u)" = 0 ] || { echo "chaos needs root (network namespaces)"; exit 1; }
  for r in $(seq 1 "$rounds"); do
    local seed
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    log "chaos round $r/$rounds: $tasks tasks, seed $seed"
    P2P_CHAOS_SEED=$seed P2P_CHAOS_TASKS=$tasks \
      cargo test -q -p tests --test chaos -- --nocapture 2>&1 | grep -E '^chaos|test result|panicked'
  done
}

fuzz_soak() {
  local secs=${1:-600}
  command -v cargo-fuzz >/dev/null || { echo "cargo install cargo-fuzz first"; exit 1; }
  for t in frame_decoder handshake beacon task_file secure_decrypt; do
    log "fuzz $t for $secs s"
    mkdir -p "fuzz/corpus/$t"
    (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" \
      -malloc_limit_mb=256 -print_final_stats=1 2>&1 |
      grep -E 'stat::number_of_executed_units|Done|ERROR|SUMMARY|panicked')
  done
}

case "${1:-}" in
  serve) serve_soak "${2:-10}" ;;
  chaos) chaos_soak "${2:-5}" "${3:-5000}" ;;
  fuzz) fuzz_soak "${2:-600}" ;;
  all) serve_soak 10; chaos_soak 5 5000; fuzz_soak 600 ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
