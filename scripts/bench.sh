#!/usr/bin/env bash
# Benchmarks this crate's server against the other Durable Streams servers,
# side by side on this machine, with the load tool in examples/load/.
#
# Usage: scripts/bench.sh
#
# Builds our server and the load tool in release, installs the peers (once)
# into $PEERS_DIR, outside the checkout, then runs every scenario against
# every server in turn (ours, peer, ours, peer, ...), each run on a freshly
# started server with an empty data directory, and prints the median of each
# figure and the ratio of ours to the best peer. Raw results, one JSON object
# per run, are kept in $BENCH_OUT/results.jsonl.
#
# Environment (all optional):
#   BENCH_SCENARIOS  scenarios to run, in order (default: all, see below)
#   BENCH_RUNS       runs of each scenario on each server (default: 3)
#   BENCH_DURATION   measured time of a throughput run (default: 10s)
#   BENCH_WARMUP     unmeasured time before it (default: 1s)
#   BENCH_APPENDS    appends measured in a live run (default: 50)
#   BENCH_PEERS      peers to compare with (default: "r1 r3 node")
#   BENCH_THREADS    worker threads of the load tool (default: 2)
#   BENCH_OUT        where results and server logs go (default: a temp dir)
#   PEERS_DIR        where peers are installed (default: ../peers)
#
# Scenarios:
#   append-file    64 connections append 256 B to 100 streams, durable storage
#   append-memory  the same, in memory
#   read-1m        catch-up read of a whole 1 MiB stream, memory
#   read-tail      read of the last 1 KiB of a 1 MiB stream, memory
#   create-memory  stream creation, memory
#   create-file    stream creation, durable storage
#   long-poll      1,000 long-poll waiters, one append per 100 ms, memory
#   sse-1k         1,000 SSE subscribers, one append per 100 ms, memory
#   sse-5k         5,000 SSE subscribers, one append per 100 ms, memory
#
# Servers, and the flags each is started with:
#   ours-file    durable-streams serve --storage file --data-dir D (fsync)
#   ours-memory  durable-streams serve --storage memory
#   r1-wal       durable-streams 0.1.5: durable-streams-server --host H
#                --port P --data-dir D (--durability wal, its default). It
#                has no --help; the flags are in its README and main.rs.
#   r1-memory    the same with --durability memory (no WAL, no fsync)
#   r3-file      durable-streams-server 0.3.0: durable-streams-server serve,
#                configured by environment (its --help shows only --profile
#                and --config; the DS_* variables are in its README):
#                DS_SERVER__BIND_ADDRESS, DS_STORAGE__MODE=file-durable
#                (fsync), DS_STORAGE__DATA_DIR, and DS_LIMITS__MAX_*_BYTES
#                raised to 16 GiB
#   r3-memory    the same with DS_STORAGE__MODE=memory
#   node-file    @durable-streams/server 0.3.7, DurableStreamTestServer
#                with dataDir (LMDB and log files)
#   node-memory  the same without dataDir
#
# Needs: cargo, jq, and for the Node peer Node.js 20 with npm. Nothing is
# installed into the checkout, and no peer code is kept in it.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

scenarios=${BENCH_SCENARIOS:-"append-file append-memory read-1m read-tail create-memory create-file long-poll sse-1k sse-5k"}
runs=${BENCH_RUNS:-3}
duration=${BENCH_DURATION:-10s}
warmup=${BENCH_WARMUP:-1s}
appends=${BENCH_APPENDS:-50}
peers=${BENCH_PEERS-"r1 r3 node"}
threads=${BENCH_THREADS:-2}
peers_dir=${PEERS_DIR:-$(cd .. && pwd)/peers}
work=$(mktemp -d "${TMPDIR:-/tmp}/durable-streams-bench-XXXXXX")
out=${BENCH_OUT:-$work}
mkdir -p "$out" "$peers_dir"
results="$out/results.jsonl"
: >"$results"

case "$repo/" in
  "$peers_dir"/*) echo "bench.sh: PEERS_DIR must be outside the checkout" >&2; exit 2 ;;
esac
case "$peers_dir/" in
  "$repo"/*) echo "bench.sh: PEERS_DIR must be outside the checkout" >&2; exit 2 ;;
esac
command -v jq >/dev/null || { echo "bench.sh: needs jq" >&2; exit 2; }

step() { printf '\n==> %s\n' "$*" >&2; }

# 5,000 SSE subscribers need 5,000 descriptors on each side of loopback.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

step "build our server and the load tool (release)"
cargo build --release --quiet --features server --bin durable-streams
cargo build --release --quiet --example load
# Private copies: a rebuild in the checkout during the run changes nothing.
mkdir -p "$work/bin"
cp "${CARGO_TARGET_DIR:-target}/release/durable-streams" "${CARGO_TARGET_DIR:-target}/release/examples/load" "$work/bin/"
ours="$work/bin/durable-streams"
load="$work/bin/load"

# Installs each peer once; a peer that fails to install is left out.
have_peers=()
install_peer() {
  local peer="$1" log="$out/install-$1.log"
  case "$peer" in
    r1)
      [ -x "$peers_dir/r1/bin/durable-streams-server" ] ||
        CARGO_TARGET_DIR="$peers_dir/target" cargo install --locked --quiet \
          durable-streams@0.1.5 --root "$peers_dir/r1" >"$log" 2>&1
      ;;
    r3)
      [ -n "$(r3_bin)" ] ||
        CARGO_TARGET_DIR="$peers_dir/target" cargo install --locked --quiet \
          durable-streams-server@0.3.0 --root "$peers_dir/r3" >"$log" 2>&1
      [ -n "$(r3_bin)" ]
      ;;
    node)
      command -v node >/dev/null &&
        { [ -d "$peers_dir/node/node_modules/@durable-streams/server" ] ||
          npm install --silent --prefix "$peers_dir/node" @durable-streams/server@0.3.7 >"$log" 2>&1; }
      ;;
    *) echo "bench.sh: unknown peer $peer" >&2; return 1 ;;
  esac
}

# durable-streams-server 0.3.0's binary, whatever its name.
r3_bin() {
  find "$peers_dir/r3/bin" -maxdepth 1 -type f -perm -u+x 2>/dev/null | head -n 1
}

for peer in $peers; do
  step "install peer $peer into $peers_dir"
  if install_peer "$peer"; then
    have_peers+=("$peer")
  else
    echo "bench.sh: peer $peer did not install (see $out/install-$peer.log); leaving it out" >&2
  fi
done

# The Node peer's start file lives in the temp dir, not in the checkout.
cat >"$work/node-start.mjs" <<EOF
import { DurableStreamTestServer } from "$peers_dir/node/node_modules/@durable-streams/server/dist/index.js";
const server = new DurableStreamTestServer({
  port: Number(process.env.PORT),
  host: "127.0.0.1",
  dataDir: process.env.DATA_DIR || undefined,
});
await server.start();
console.log("listening on 127.0.0.1:" + process.env.PORT);
EOF

# A free port below the ephemeral range (32768 and up on Linux), so that the
# thousands of client connections of a live run never hold it.
pick_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((10000 + RANDOM % 22000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

# The servers each scenario compares, ours first.
servers_of() {
  local storage
  case "$1" in
    append-file | create-file) storage=file ;;
    *) storage=memory ;;
  esac
  echo "ours-$storage"
  local peer
  for peer in "${have_peers[@]}"; do
    case "$peer:$storage" in
      r1:file) echo r1-wal ;;
      *) echo "$peer-$storage" ;;
    esac
  done
}

# The load tool's arguments for a scenario.
load_args() {
  local timed=(--duration "$duration" --warmup "$warmup")
  case "$1" in
    append-*) echo append --connections 64 --body-size 256 --streams 100 "${timed[@]}" ;;
    read-1m) echo read --size 1048576 --connections 4 "${timed[@]}" ;;
    read-tail) echo read --size 1048576 --tail 1024 --connections 16 "${timed[@]}" ;;
    create-*) echo create --connections 16 "${timed[@]}" ;;
    long-poll) echo long-poll --waiters 1000 --appends "$appends" ;;
    sse-1k) echo sse --subscribers 1000 --appends "$appends" ;;
    sse-5k) echo sse --subscribers 5000 --appends "$appends" ;;
    *) echo "bench.sh: unknown scenario $1" >&2; return 1 ;;
  esac
}

# The stream URL prefix of a server.
url_of() {
  case "$1" in
    ours-*) echo "http://127.0.0.1:$2/v1/stream" ;;
    r3-*) echo "http://127.0.0.1:$2/v1/stream" ;;
    *) echo "http://127.0.0.1:$2" ;;
  esac
}

server_pid=""
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}
trap 'stop_server; rm -rf "$work/data"' EXIT

# Starts server $1 on port $2 with data directory $3; sets server_pid.
start_server() {
  local server="$1" port="$2" data="$3" log="$out/$1.log"
  local r3
  r3=$(r3_bin)
  # 0.3.0 caps memory at 100 MiB and a stream at 10 MiB by default, which an
  # append run passes in seconds.
  local r3_limits=(env DS_LIMITS__MAX_MEMORY_BYTES=$((16 << 30)) DS_LIMITS__MAX_STREAM_BYTES=$((16 << 30)))
  case "$server" in
    ours-file) "$ours" serve --addr "127.0.0.1:$port" --storage file --data-dir "$data" >>"$log" 2>&1 & ;;
    ours-memory) "$ours" serve --addr "127.0.0.1:$port" --storage memory >>"$log" 2>&1 & ;;
    r1-wal) "$peers_dir/r1/bin/durable-streams-server" --host 127.0.0.1 --port "$port" --data-dir "$data" >>"$log" 2>&1 & ;;
    r1-memory) "$peers_dir/r1/bin/durable-streams-server" --host 127.0.0.1 --port "$port" --data-dir "$data" --durability memory >>"$log" 2>&1 & ;;
    r3-file)
      DS_SERVER__BIND_ADDRESS="127.0.0.1:$port" DS_STORAGE__MODE=file-durable \
        DS_STORAGE__DATA_DIR="$data" "${r3_limits[@]}" "$r3" serve >>"$log" 2>&1 &
      ;;
    r3-memory)
      DS_SERVER__BIND_ADDRESS="127.0.0.1:$port" DS_STORAGE__MODE=memory \
        "${r3_limits[@]}" "$r3" serve >>"$log" 2>&1 &
      ;;
    node-file) PORT="$port" DATA_DIR="$data" node "$work/node-start.mjs" >>"$log" 2>&1 & ;;
    node-memory) PORT="$port" node "$work/node-start.mjs" >>"$log" 2>&1 & ;;
    *) echo "bench.sh: unknown server $server" >&2; return 1 ;;
  esac
  server_pid=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "bench.sh: $server did not start; the end of its log:" >&2
  tail -n 20 "$log" >&2
  stop_server
  return 1
}

# One run of scenario $1 against server $2.
run_one() {
  local scenario="$1" server="$2" run="$3" port data args line try
  data="$work/data/$server-$run"
  mkdir -p "$data"
  for try in 1 2 3; do
    port=$(pick_port)
    start_server "$server" "$port" "$data" && break
    [ "$try" -lt 3 ] || return 0
  done
  read -r -a args <<<"$(load_args "$scenario")"
  # Live runs report the server's memory, the others its CPU time per
  # request.
  args+=(--server-pid "$server_pid")
  if line=$("$load" --url "$(url_of "$server" "$port")" --label "$server" --threads "$threads" \
    --json "${args[@]}" 2>>"$out/load.log"); then
    jq -c --arg bench "$scenario" --arg server "$server" --argjson run "$run" \
      '. + {bench: $bench, server: $server, run: $run}' <<<"$line" >>"$results"
    tail -n 1 "$out/load.log" >&2
  else
    echo "bench.sh: $scenario on $server failed; see $out/load.log" >&2
  fi
  stop_server
  rm -rf "$data"
}

for scenario in $scenarios; do
  load_args "$scenario" >/dev/null
  mapfile -t servers < <(servers_of "$scenario")
  step "$scenario: ${servers[*]}, $runs runs each"
  for run in $(seq 1 "$runs"); do
    for server in "${servers[@]}"; do
      run_one "$scenario" "$server" "$run"
    done
  done
done

step "medians of $runs runs (results: $results)"
jq -s -r '
  def median: map(select(. != null)) | sort | if length == 0 then null
    elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def r(n): if . == null then "-" else (. * pow(10; n) | round) / pow(10; n) | tostring end;
  def live: .bench | test("^(long-poll|sse)");
  group_by(.bench) | .[] | . as $rows
  | ($rows[0] | live) as $live
  | [group_by(.server)
     | sort_by(if .[0].server | startswith("ours") then 0 else 1 end)[] | {
      bench: .[0].bench, server: .[0].server, runs: length,
      ops: (map(.metrics.ops_per_sec) | median),
      gbs: (map(.metrics.gb_per_sec) | median),
      p50: (map(.metrics.p50_ms) | median),
      p99: (map(.metrics.p99_ms) | median),
      rss: (map(.metrics.rss_mb) | median),
      cpu: (map(.metrics.server_cpu_us_per_op) | median),
      missed: (map(.metrics.missed) | median),
      errors: (map(.metrics.errors) | add)
    }] as $stats
  | ($stats | map(select(.server | startswith("ours")))[0]) as $ours
  | ($stats | map(select(.server | startswith("ours") | not))) as $peers
  | ($stats[] | [.bench, .server, (.runs | tostring),
      (.ops | r(0)), (.gbs | r(2)), (.p50 | r(2)), (.p99 | r(2)), (.rss | r(1)),
      (.cpu | r(1)), (.missed | r(0)), (.errors | tostring)] | @tsv),
    (if $ours == null or ($peers | length) == 0 then empty
     elif $live then
       ($peers | min_by(.p99)) as $best
       | ($peers | map(select(.rss != null)) | min_by(.rss)) as $lean
       | [$ours.bench, "ours / best peer (lower is better)", "", "", "",
          "", ($ours.p99 / $best.p99 | r(2) | . + "x \($best.server)"),
          (if $lean == null or $ours.rss == null then "-"
           else ($ours.rss / $lean.rss | r(2) | . + "x \($lean.server)") end)] | @tsv
     else
       ($peers | max_by(.ops)) as $best
       | [$ours.bench, "ours / best peer (higher is better)", "",
          ($ours.ops / $best.ops | r(2) | . + "x \($best.server)")] | @tsv
     end)
' "$results" | {
  printf 'scenario\tserver\truns\tops/s\tGB/s\tp50 ms\tp99 ms\tRSS MB\tCPU us/op\tmissed\terrors\n'
  cat
} | column -t -s $'\t'
