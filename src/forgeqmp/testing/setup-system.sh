#!/usr/bin/env bash
# Install, idempotently and as root on Debian 12, everything forgeqmp's tests and demo need:
#   - QEMU 10.x (qemu-system-x86, qemu-utils) from the bookworm-backports suite, added to the machine's
#     existing Debian apt source (no host name is written: the existing entry's URI is reused);
#   - QEMU 7.2 from bookworm, unpacked side by side into $FORGEQMP_PREFIX/qemu-7.2 (never installed over 10.x);
#   - the test guest's ingredients: a Debian 6.1 kernel and busybox-static, unpacked into $FORGEQMP_PREFIX/guest;
#   - for the platform-style guests (forgeqmp.testing.platforms): UEFI firmware (ovmf) and an ISO tool
#     (genisoimage).
# Re-running it when everything is present takes well under a second.
set -euo pipefail

PREFIX="${FORGEQMP_PREFIX:-/opt/forgeqmp}"
Q72="$PREFIX/qemu-7.2"
GUEST="$PREFIX/guest"
STAMP="$PREFIX/.setup-v1"

log() { printf 'setup-system: %s\n' "$*" >&2; }

have_all() {
    [ -f "$STAMP" ] || return 1
    command -v qemu-system-x86_64 >/dev/null || return 1
    command -v qemu-img >/dev/null || return 1
    qemu-system-x86_64 --version | grep -q 'version 10\.' || return 1
    # 7.2 must run, not merely be executable (a half-unpacked prefix or a missing library).
    QEMU_MODULE_DIR="$Q72/usr/lib/x86_64-linux-gnu/qemu" "$Q72/usr/bin/qemu-system-x86_64" --version \
        2>/dev/null | grep -q 'version 7\.2\.' || return 1
    "$Q72/usr/bin/qemu-img" --version 2>/dev/null | grep -q 'version 7\.2\.' || return 1
    [ -f "$GUEST/vmlinuz" ] && [ -d "$GUEST/modules" ] && [ -x "$GUEST/busybox" ] || return 1
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] && [ -f /usr/share/OVMF/OVMF_VARS_4M.fd ] || return 1
    command -v genisoimage >/dev/null || return 1
}

if have_all; then
    log "everything present ($PREFIX)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs Debian packages); everything else in forgeqmp runs unprivileged"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# --- 1. bookworm-backports, added to the existing Debian source -------------------------------------
add_backports() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    if [ -f /etc/apt/sources.list.d/debian.sources ] &&
        grep -q '^Suites:.*bookworm-updates' /etc/apt/sources.list.d/debian.sources; then
        log "adding bookworm-backports to debian.sources"
        sed -i 's/^\(Suites:.*bookworm-updates\)\(.*\)$/\1 bookworm-backports\2/' \
            /etc/apt/sources.list.d/debian.sources
    elif grep -qs '^deb .* bookworm-updates' /etc/apt/sources.list; then
        log "adding bookworm-backports to sources.list"
        grep '^deb .* bookworm-updates' /etc/apt/sources.list | head -n 1 |
            sed 's/bookworm-updates/bookworm-backports/' >/etc/apt/sources.list.d/bookworm-backports.list
    else
        log "cannot find the Debian bookworm apt source to add backports to"
        exit 1
    fi
}
add_backports
apt-get update -qq

# --- 2. QEMU 10.x on the system ---------------------------------------------------------------------
if ! (command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 --version | grep -q 'version 10\.'); then
    log "installing QEMU from bookworm-backports"
    apt-get install -y -qq -t bookworm-backports --no-install-recommends \
        qemu-system-x86 qemu-utils qemu-system-data >/dev/null
fi
# Firmware both QEMUs use; tools the harness and tests call.
apt-get install -y -qq --no-install-recommends seabios ipxe-qemu e2fsprogs >/dev/null
# The platform-style guests: UEFI firmware (pflash code + vars templates) and an ISO for the ide-cd.
apt-get install -y -qq --no-install-recommends ovmf genisoimage >/dev/null

# --- 3. Side-by-side packages unpacked into a prefix --------------------------------------------------
work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

# Newest version of PACKAGE in the plain bookworm suites (never the backport).
bookworm_version() {
    apt-cache madison "$1" | awk -F'|' '$3 !~ /backports/ {gsub(/ /, "", $2); print $2; exit}'
}

unpack() { # unpack DEST PACKAGE[=VERSION]...
    local dest=$1
    shift
    (cd "$work" && apt-get download -qq "$@" >/dev/null)
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
    rm -f "$work"/*.deb
}

if [ ! -x "$Q72/usr/bin/qemu-system-x86_64" ]; then
    v=$(bookworm_version qemu-system-x86)
    case "$v" in 1:7.2*) ;; *) log "no QEMU 7.2 in bookworm (found '$v')"; exit 1 ;; esac
    log "unpacking QEMU $v into $Q72"
    rm -rf "$Q72.tmp" && mkdir -p "$Q72.tmp"
    pkgs=()
    for p in qemu-system-x86 qemu-system-common qemu-system-data qemu-utils qemu-block-extra; do
        pkgs+=("$p=$(bookworm_version "$p")")
    done
    unpack "$Q72.tmp" "${pkgs[@]}"
    rm -rf "$Q72" && mv "$Q72.tmp" "$Q72"
fi

if [ ! -f "$GUEST/vmlinuz" ] || [ ! -x "$GUEST/busybox" ] || [ ! -d "$GUEST/modules" ]; then
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6\.1/ {print $2; exit}')
    [ -n "$kpkg" ] || { log "cannot resolve the bookworm 6.1 kernel package"; exit 1; }
    log "unpacking $kpkg and busybox-static into $GUEST"
    rm -rf "$GUEST.tmp" && mkdir -p "$GUEST.tmp/root"
    unpack "$GUEST.tmp/root" "$kpkg" busybox-static
    kver=${kpkg#linux-image-}
    cp "$GUEST.tmp/root/boot/vmlinuz-$kver" "$GUEST.tmp/vmlinuz"
    cp "$GUEST.tmp/root/bin/busybox" "$GUEST.tmp/busybox"
    mv "$GUEST.tmp/root/lib/modules/$kver" "$GUEST.tmp/modules"
    echo "$kver" >"$GUEST.tmp/kernel-version"
    rm -rf "$GUEST.tmp/root"
    rm -rf "$GUEST" && mv "$GUEST.tmp" "$GUEST"
fi

touch "$STAMP"
log "done: $(qemu-system-x86_64 --version | head -n 1); $("$Q72/usr/bin/qemu-system-x86_64" --version 2>&1 | head -n 1)"
