#!/usr/bin/env bash
# Sets up everything aiovirt needs on a fresh Debian/Ubuntu machine, idempotently:
# QEMU and the tools that build the tiny test guest (OS packages), then a virtualenv in .venv
# with aiovirt installed in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
# libvirt-clients brings virt-xml-validate (the tests check exported domain XML with it, and
# define it in libvirt's test:/// driver with virsh); it runs xmllint from libxml2-utils.
# libvirt's daemon: the remote driver's tests run it (scripts/libvirtd.sh, a private one per test);
# chromium and its driver: the web example's page is checked in a real headless browser;
# sshd and nc: qemu+ssh:// is tested through a private sshd on the loopback address
# strace: how a spawned QEMU's fds are closed is checked on the system calls (tests/test_spawn.py)
PKGS="qemu-system-x86 qemu-utils busybox-static cpio libvirt-clients libxml2-utils libvirt-daemon libvirt-daemon-driver-qemu openssl util-linux chromium chromium-driver openssh-server netcat-openbsd strace"
missing=""
for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"; done
# apt lists are also needed later by `apt-get download` (the tiny guest's kernel)
if [ -n "$missing" ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  $SUDO apt-get update -qq
fi
if [ -n "$missing" ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null; "$PY" -m venv .venv; }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
