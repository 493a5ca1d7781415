# Shared helpers for Husk's build and test scripts. Source it; do not run it.
#
# HUSK_CACHE_DIR holds outputs that are expensive to rebuild (guest kernel, test
# host images), each under a directory named by the hash of its inputs, so a
# rebuild with unchanged inputs is a copy, and changed inputs never reuse a
# stale output.

HUSK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HUSK_CACHE_DIR=${HUSK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/husk}
export HUSK_ROOT HUSK_CACHE_DIR

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# vm_host: where Husk guests run on this machine: "direct" when its KVM can run them (as
# `husk check --only kvm` decides), otherwise "testhost" (the nested test host); HUSK_VM_HOST
# overrides.
vm_host() {
    local host=${HUSK_VM_HOST:-} husk=$HUSK_ROOT/target/debug/husk
    if [ -z "$host" ]; then
        [ -x "$husk" ] || die "$husk missing: run 'make build'"
        if "$husk" check --only kvm >/dev/null 2>&1; then host=direct; else host=testhost; fi
    fi
    case "$host" in
    direct|testhost) echo "$host" ;;
    *) die "HUSK_VM_HOST must be 'direct' or 'testhost', not '$host'" ;;
    esac
}

# What CRI pods need on the VM host besides Husk (tests/vm-host-run options): runc for the
# baselines, the CNI plugins of tests/containerd-env's network, iproute2 for leftover checks.
CRI_VM_HOST_FILES=(--with /usr/sbin/runc --with /usr/lib/cni/bridge --with /usr/lib/cni/host-local
                   --with /usr/lib/cni/loopback --with /usr/bin/ip --with /usr/sbin/tc)

# cri_images PREFIX: builds the offline busybox and pause images as PREFIX-busybox.tar and
# PREFIX-pause.tar, and prints the shell command that imports both into CRI's namespace.
cri_images() {
    # Chained, so a failed build fails the command substitution the caller assigns from.
    "$HUSK_ROOT/scripts/busybox-oci-image" "$1-busybox.tar" >/dev/null &&
        "$HUSK_ROOT/scripts/busybox-oci-image" "$1-pause.tar" docker.io/library/pause:husk '["sleep","2147483647"]' >/dev/null &&
        echo "ctr -n k8s.io images import $1-busybox.tar >/dev/null && ctr -n k8s.io images import $1-pause.tar >/dev/null"
}

# inputs_hash FILE|-STRING... : sha256 over the named files' contents and any
# literal strings (prefixed with '=') such as package versions.
inputs_hash() {
    local item
    for item in "$@"; do
        case "$item" in
        =*) printf 'str:%s\n' "${item#=}" ;;
        *) [ -f "$item" ] || die "hash input missing: $item"
           printf 'file:%s:%s\n' "${item#"$HUSK_ROOT"/}" "$(sha256sum <"$item" | cut -d' ' -f1)" ;;
        esac
    done | sha256sum | cut -c1-16
}

# deb_version PKG : installed version of a Debian package, or fail loudly.
deb_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || die "Debian package '$1' is not installed (run .ci/run or 'make deps')"
}

# cache_publish DIR_TMP DIR_FINAL : move a fully built cache entry into place
# atomically, so an interrupted build never leaves a half-written entry.
cache_publish() {
    mkdir -p "$(dirname "$2")"
    rm -rf "$2.old"
    [ -e "$2" ] && mv "$2" "$2.old"
    mv "$1" "$2"
    rm -rf "$2.old"
}
