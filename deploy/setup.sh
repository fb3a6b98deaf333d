#!/usr/bin/env bash
# Idempotent set-up on Debian 12 (as root, or with sudo): system packages, the project's
# virtualenv (.venv, editable install with test extras) and the cached test guest.
# Re-running is cheap: apt is skipped when everything is installed, pip when pyproject.toml
# is unchanged, the guest build when its stamp matches.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi

PKGS=(qemu-system-x86 qemu-system-common qemu-utils fio busybox-static e2fsprogs cpio
      xz-utils zstd util-linux python3 python3-venv python3-dev gcc
      systemd libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils
      ceph-mon ceph-osd ceph-common librbd-dev librados-dev qemu-block-extra iproute2)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

# The guest builder needs apt's package lists (apt-cache depends / apt-get download) even
# when nothing is missing.
if [ ${#missing[@]} -gt 0 ] \
   || ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "system packages present"
fi

# The users Debian's libvirt-daemon-system would create (it also starts services, which a
# container without systemd cannot): QEMU under libvirt runs as libvirt-qemu, in group kvm,
# the group that may open the backend's socket (deploy/README.md).
getent group kvm >/dev/null || "${SUDO[@]}" groupadd -r kvm
getent group libvirt-qemu >/dev/null || "${SUDO[@]}" groupadd -r libvirt-qemu
if ! getent passwd libvirt-qemu >/dev/null; then
    log "creating user libvirt-qemu (groups libvirt-qemu, kvm)"
    "${SUDO[@]}" useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin \
        libvirt-qemu
fi

PY=$(command -v python3)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "creating .venv with $PY ($("$PY" --version))"
    rm -rf .venv
    "$PY" -m venv .venv
fi

stamp=.venv/.vhost-user-blk-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import blkdev' 2>/dev/null; then
    log "pip install -e '.[test]'"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e "$REPO[test]"
    echo "$want" > "$stamp"
else
    log "python environment up to date"
fi

# The C parts (cffi, API mode), compiled in place with -Wall -Wextra -Werror; always rebuilt
# (a second or two), so a checkout never runs a stale one.
log "native (cffi)"
.venv/bin/python -m vhost_user.native.build
.venv/bin/python -m blkdev.native.build

log "guest"
.venv/bin/python -m deploy.guest build
log "done"
