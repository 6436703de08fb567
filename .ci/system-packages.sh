#!/bin/sh
# The Debian packages `make demo`, `make test` and CI need, in one place.
#
#   .ci/system-packages.sh demo|test|ci [STAMP]
#
# As root: installs what is missing (apt-get update only then) and, for test and ci,
# stops a packaged coturn daemon so it does not hold port 3478.  Otherwise: says which
# packages are missing and how to install them, and exits 0, so the tests that need them
# skip (with CI=true they fail instead).  STAMP is touched only when nothing is missing.
set -eu

# demo: the venv, and as root the two firewalled namespaces (ip, ss; nft; sysctl).
demo="python3-venv iproute2 nftables procps"
# test: + NAT mapping deletion (conntrack), STUN servers (coturn), the lab's delay
# stage (iptables' NFQUEUE target; nft's own `queue` is not in the kernel), QEMU,
# libvirt's daemons and virsh for the libvirt lab, and what pip needs to build the
# libvirt Python binding (the `libvirt` extra) against them, and the lab's port-mapping
# router (miniupnpd with its nftables backend: PCP, NAT-PMP); qemu-img for the libvirt
# tests' qcow2 overlays (--copy-storage-inc).
test="$demo conntrack coturn iptables qemu-system-x86 libvirt-daemon-system libvirt-clients"
test="$test libvirt-dev pkg-config gcc python3-dev"
test="$test miniupnpd-nftables qemu-utils"

case "${1-}" in
demo) need=$demo ;;
test) need=$test ;;
ci) need="$test make" ;;
*)
    echo "usage: $0 demo|test|ci [STAMP]" >&2
    exit 2
    ;;
esac
stamp=${2-}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system packages: not a Debian system (no dpkg-query); make sure the equivalents" \
        "of these are installed: $need"
    exit 0
fi

missing_packages() {
    for pkg in $need; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            printf '%s ' "$pkg"
    done
}

missing=$(missing_packages)
missing=${missing% }
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "system packages missing for make $1: $missing"
        echo "  install them with: sudo apt-get install --no-install-recommends $missing"
        echo "  until then what needs them is skipped (with CI=true the tests fail)"
        exit 0
    fi
    echo "system packages: installing $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    still=$(missing_packages)
    if [ -n "$still" ]; then
        echo "system packages: still missing after apt-get install: $still" >&2
        exit 1
    fi
fi

case " $need " in
*" coturn "*)
    if [ "$(id -u)" -eq 0 ]; then
        # The suite starts its own STUN servers (turnserver -n, no configuration file);
        # only the packaged daemon (-c /etc/turnserver.conf) is stopped.
        if command -v systemctl >/dev/null 2>&1 && systemctl stop coturn >/dev/null 2>&1; then
            :
        elif command -v service >/dev/null 2>&1; then
            service coturn stop >/dev/null 2>&1 || true
        fi
        pkill -f 'turnserver -c /etc/turnserver\.conf' >/dev/null 2>&1 || true
    fi
    ;;
esac

if [ -n "$stamp" ]; then
    mkdir -p "$(dirname "$stamp")"
    touch "$stamp"
fi
