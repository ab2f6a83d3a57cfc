#!/usr/bin/env bash
# The one test command: prepares the test environment, builds the release binary and runs every
# test target (unit tests and the real-mount integration tests against fake-gcs-server).
# Extra arguments go to `cargo test`, e.g. `bash scripts/test.sh --test mount_data`.
# Missing dependencies are errors, never skips.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

export PHYSIOFS_VENV="${PHYSIOFS_VENV:-$REPO/.venv}"
FAKE_GCS="$(bash "$REPO/scripts/setup-test-env.sh" | tail -n 1)"
[ -x "$FAKE_GCS" ] || { echo "test.sh: fake-gcs-server not found after setup ($FAKE_GCS)" >&2; exit 1; }
export PHYSIOFS_FAKE_GCS="$FAKE_GCS"

[ "$(id -u)" -eq 0 ] || echo "test.sh: warning: not root; mounts need fusermount3 and user_allow_other may matter" >&2

cargo build --release
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
# The harness times out every mount, unmount and child command, but a read stuck in the kernel
# on a broken FUSE daemon could still hang a test: bound the whole run (exit 124 = timed out).
# --no-fail-fast: one failing test binary must not hide the others' results.
# Output is kept to add up every binary's "test result:" line into one closing summary.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
timeout -k 30s "${PHYSIOFS_TEST_TIMEOUT:-30m}" cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "physiofs-tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
