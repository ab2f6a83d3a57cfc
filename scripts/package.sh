#!/usr/bin/env bash
# Builds the two ways users install physiofs, from the release binary:
#   - a Debian package (cargo-deb, configured in Cargo.toml's [package.metadata.deb]):
#     /usr/bin/physiofs, fuse3 dependency, docs, /etc/physiofs/example.env, physiofs@.service;
#   - a Python wheel (maturin, scripts/package/python/pyproject.toml): the binary on the
#     environment's PATH plus the `physiofs` module (physiofs.mount / unmount / MountError).
# Both land in $PHYSIOFS_PACKAGE_DIR (default target/package/); their paths are the last lines
# printed. cargo-deb and maturin are installed if missing (pinned versions; maturin and wheel
# in a venv of their own, $PHYSIOFS_TOOLS_VENV, default target/package-tools/).
#
# Usage: bash scripts/package.sh [--deb] [--wheel] [--tools] [--no-build]
#   --deb / --wheel  build only that one (default: both)
#   --tools          only install the tools (what scripts/setup-test-env.sh runs)
#   --no-build       use target/release/physiofs as it is instead of `cargo build --release`
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
MATURIN_VERSION=1.16.0
WHEEL_VERSION=0.48.0

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${PHYSIOFS_PACKAGE_DIR:-$REPO/target/package}"
TOOLS="${PHYSIOFS_TOOLS_VENV:-$REPO/target/package-tools}"
BIN="$REPO/target/release/physiofs"

log() { echo "package: $*" >&2; }
die() { echo "package: ERROR: $*" >&2; exit 1; }

want_deb=0 want_wheel=0 tools_only=0 build=1
for a in "$@"; do
    case "$a" in
        --deb) want_deb=1 ;;
        --wheel) want_wheel=1 ;;
        --tools) tools_only=1 ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument $a (see --help)" ;;
    esac
done
[ "$want_deb$want_wheel" = 00 ] && want_deb=1 want_wheel=1

# Tools ------------------------------------------------------------------------------------
install_cargo_deb() {
    if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
        log "installing cargo-deb $CARGO_DEB_VERSION (cargo install, about a minute)"
        cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet \
            || die "cargo install cargo-deb --version $CARGO_DEB_VERSION failed"
    fi
    command -v strip >/dev/null 2>&1 || die "strip (binutils) is missing: apt-get install binutils"
}

install_maturin() {
    if [ ! -x "$TOOLS/bin/python" ]; then
        log "creating the packaging venv $TOOLS"
        python3 -m venv "$TOOLS" || die "python3 -m venv $TOOLS failed (on Debian: apt-get install python3-venv)"
    fi
    if [ "$("$TOOLS/bin/maturin" --version 2>/dev/null)" != "maturin $MATURIN_VERSION" ] \
        || [ "$("$TOOLS/bin/wheel" version 2>/dev/null)" != "wheel $WHEEL_VERSION" ]; then
        log "pip installing maturin==$MATURIN_VERSION wheel==$WHEEL_VERSION into $TOOLS"
        "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check \
            "maturin==$MATURIN_VERSION" "wheel==$WHEEL_VERSION" \
            || die "pip install maturin==$MATURIN_VERSION wheel==$WHEEL_VERSION failed"
    fi
}

[ "$want_deb" = 1 ] && install_cargo_deb
[ "$want_wheel" = 1 ] && install_maturin
[ "$tools_only" = 1 ] && { log "ok: tools installed"; exit 0; }

# The binary -------------------------------------------------------------------------------
if [ "$build" = 1 ]; then
    cargo build --release
fi
[ -x "$BIN" ] || die "$BIN is missing: run cargo build --release (or drop --no-build)"
mkdir -p "$OUT"
built=()

# Debian package ---------------------------------------------------------------------------
if [ "$want_deb" = 1 ]; then
    rm -f "$OUT"/physiofs_*.deb
    # --strip: the release profile keeps line tables for backtraces; the package does not.
    deb="$(cargo deb --no-build --strip --quiet -o "$OUT/" | tail -n 1)"
    [ -f "$deb" ] || die "cargo deb printed no package path (got: $deb)"
    built+=("$deb")
fi

# Python wheel -----------------------------------------------------------------------------
if [ "$want_wheel" = 1 ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    before="$(stat -c '%i %Y' "$BIN")"
    # maturin runs `cargo build --release` for the binary, which is fresh: it reuses it. (No
    # `strip = true` in pyproject.toml: that passes a rustc flag, rebuilding and overwriting
    # target/release/physiofs; the copy in the wheel is stripped below instead.)
    (cd "$REPO/scripts/package/python" && "$TOOLS/bin/maturin" build --release --quiet -o "$tmp/raw") >&2 \
        || die "maturin build failed"
    [ "$(stat -c '%i %Y' "$BIN")" = "$before" ] \
        || die "maturin's cargo build replaced $BIN instead of reusing it (was it built by \`cargo test\`, \
or with other flags? run without --no-build)"
    raw=("$tmp"/raw/physiofs-*.whl)
    [ -f "${raw[0]}" ] || die "maturin produced no wheel in $tmp/raw"
    "$TOOLS/bin/wheel" unpack -d "$tmp/unpacked" "${raw[0]}" >/dev/null
    script=("$tmp"/unpacked/physiofs-*/physiofs-*.data/scripts/physiofs)
    [ -f "${script[0]}" ] || die "the wheel has no physiofs executable in its scripts"
    strip "${script[0]}"
    rm -f "$OUT"/physiofs-*.whl
    # `wheel pack` rewrites RECORD with the stripped binary's hash.
    "$TOOLS/bin/wheel" pack -d "$OUT" "$tmp"/unpacked/physiofs-*/ >/dev/null
    whl=("$OUT"/physiofs-*.whl)
    [ -f "${whl[0]}" ] || die "wheel pack produced nothing in $OUT"
    built+=("${whl[0]}")
fi

for f in "${built[@]}"; do
    log "built $f ($(du -h "$f" | cut -f1))"
done
printf '%s\n' "${built[@]}"
