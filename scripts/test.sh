#!/usr/bin/env bash
# Runs every check and test of the crate:
#   formatting, clippy, unit + integration + doc tests, and the official
#   Durable Streams conformance suite against the real server binary.
#
# Usage: scripts/test.sh
# Needs: the Rust toolchain (with rustfmt and clippy), Node.js 20 with npm,
# and ../shared beside the checkout (override with DS_SHARED=/path/to/shared).
# PostgreSQL storage is tested against DS_TEST_DATABASE_URL (default: the
# local postgres://postgres@127.0.0.1:5432/test), each run in schemas of its
# own; those steps are skipped, saying so, only when nothing answers there.
set -euo pipefail

cd "$(dirname "$0")/.."
shared="${DS_SHARED:-$(cd .. && pwd)/shared}"
if [ ! -f "$shared/conformance/run.sh" ]; then
  echo "test.sh: no conformance suite at $shared/conformance/run.sh (set DS_SHARED)" >&2
  exit 2
fi

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --all-features --quiet -- -D warnings

# Each optional part on its own must build cleanly too: a user who
# enables only `file` or only `subscriptions` gets no warnings.
for features in "" file subscriptions client postgres; do
  step "cargo clippy --lib --no-default-features --features '$features'"
  cargo clippy --lib --no-default-features --features "$features" --quiet -- -D warnings
done

step "cargo doc (no warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --all-features --no-deps --quiet

step "cargo test (unit, integration, doc)"
cargo test --all-features

step "cargo test: the cases suite again, over file storage"
DS_TEST_STORAGE=file cargo test --all-features --test cases

database_url="${DS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export DS_TEST_DATABASE_URL="$database_url"
# host:port of the URL, for a reachability check that needs no psql.
db_hostport="${database_url#*://}"
db_hostport="${db_hostport#*@}"
db_hostport="${db_hostport%%/*}"
db_host="${db_hostport%%:*}"
db_port="${db_hostport##*:}"
[ "$db_port" = "$db_hostport" ] && db_port=5432
postgres_up=0
if (exec 3<>"/dev/tcp/$db_host/$db_port") 2>/dev/null; then
  postgres_up=1
fi

if [ "$postgres_up" -eq 1 ]; then
  step "cargo test: the cases suite again, over PostgreSQL storage ($database_url)"
  DS_TEST_STORAGE=postgres cargo test --all-features --test cases
else
  step "SKIPPED: the cases suite over PostgreSQL storage: nothing listens at $db_host:$db_port (set DS_TEST_DATABASE_URL)"
fi

step "build the server binary"
cargo build --features server --bin durable-streams --quiet

# A free port on loopback for the server under test, outside the kernel's
# ephemeral range: a port there may be held by an outgoing connection,
# which a connect test cannot see but which makes bind fail.
pick_port() {
  local port low=32768 high=60999
  if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
    read -r low high </proc/sys/net/ipv4/ip_local_port_range
  fi
  for _ in $(seq 1 50); do
    if [ "$low" -gt 11024 ]; then
      port=$((10000 + RANDOM % (low - 10000)))
    else
      port=$((high + 1 + RANDOM % (65535 - high)))
    fi
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

run_conformance() {
  local storage="$1" port log data pid status=0 extra=() schema=""
  if [ "$storage" = postgres ]; then
    # A schema of its own, so that concurrent runs never meet.
    schema="conformance_$$_$RANDOM"
    extra=(--database-url "$database_url" --database-schema "$schema")
  fi
  log=$(mktemp "${TMPDIR:-/tmp}/durable-streams-$storage-XXXXXX.log")
  data=$(mktemp -d "${TMPDIR:-/tmp}/durable-streams-data-XXXXXX")
  # Another process may take the port between the check and the bind:
  # then the server exits at once, and another port is tried.
  local attempt up=0
  for attempt in 1 2 3 4 5; do
    port=$(pick_port)
    step "conformance suite against 'durable-streams serve --storage $storage' on port $port"
    "${CARGO_TARGET_DIR:-target}/debug/durable-streams" serve --addr "127.0.0.1:$port" --storage "$storage" \
      --data-dir "$data" "${extra[@]}" --long-poll-timeout 500ms --allow-localhost-webhooks \
      >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
      if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        up=1
        break
      fi
      if ! kill -0 "$pid" 2>/dev/null; then break; fi
      sleep 0.1
    done
    [ "$up" -eq 1 ] && break
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "test.sh: the server did not come up (attempt $attempt); its log:" >&2
    cat "$log" >&2
    grep -q "Address already in use" "$log" || break
  done
  if [ "$up" -ne 1 ]; then
    rm -rf "$data"
    return 1
  fi
  # --subscriptions adds the reserved __ds group; its webhook receivers
  # listen on localhost, hence --allow-localhost-webhooks above.
  bash "$shared/conformance/run.sh" --subscriptions "http://127.0.0.1:$port" || status=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$data"
  if [ -n "$schema" ]; then
    if command -v psql >/dev/null 2>&1; then
      psql "$database_url" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 ||
        echo "test.sh: could not drop schema $schema" >&2
    else
      echo "test.sh: no psql to drop schema $schema; it is left in $database_url" >&2
    fi
  fi
  if [ "$status" -ne 0 ]; then
    echo "test.sh: server log ($log):" >&2
    tail -n 50 "$log" >&2
  else
    rm -f "$log"
  fi
  return "$status"
}

status=0
run_conformance memory || status=1
run_conformance file || status=1
if [ "$postgres_up" -eq 1 ]; then
  run_conformance postgres || status=1
else
  step "SKIPPED: conformance suite against --storage postgres: nothing listens at $db_host:$db_port (set DS_TEST_DATABASE_URL)"
fi
exit "$status"
