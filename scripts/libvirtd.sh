#!/usr/bin/env bash
# A private libvirtd for tests and benchmarks: libvirt 9.0 from Debian's packages, its own
# configuration, state and socket directory, so that several daemons (one per DIR) can stand for
# several hosts on one machine.
#
#   scripts/libvirtd.sh install       install the packages if missing (idempotent)
#   scripts/libvirtd.sh start DIR     start a daemon whose everything lives in DIR; prints its socket
#   scripts/libvirtd.sh stop DIR      stop it and every guest it started; idempotent
#   scripts/libvirtd.sh socket DIR    print the read-write socket's path
#
# Clients reach it with e.g. `virsh -c "test+unix:///default?socket=$(scripts/libvirtd.sh socket DIR)"`
# or qemu+unix:///system?socket=... . Clients need no authentication (auth_unix_rw = "none", no polkit):
# DIR's own permissions are the access control, so keep DIR private (a test's tmp directory).
#
# How it stays private while running guests as root: a privileged libvirtd always reads
# /etc/libvirt and keeps its state in /run/libvirt and /var/lib/libvirt (its QEMU driver locks
# /run/libvirt/qemu/driver.pid, so two daemons would collide). The daemon is therefore started in
# its own mount namespace in which DIR's subdirectories are bind-mounted over those paths; only
# the socket directory (DIR/sock, outside the bind mounts) is seen from outside. The namespace and
# its mounts vanish with the daemon and its guests. qemu.conf runs guests as root without the
# layers such machines lack: no virtlogd (stdio_handler = "file"), no cgroups, no namespaces, no
# security driver. Needs root (or sudo) and CAP_SYS_ADMIN for unshare(1).
#
# The daemon's keepalive (it pings clients that asked for keepalive, and drops those that stop
# answering) follows LIBVIRTD_KEEPALIVE_INTERVAL and LIBVIRTD_KEEPALIVE_COUNT (libvirt's defaults, 5
# and 5, if unset): tests make it short to see that pings are answered.
#
# LIBVIRTD_TLS_PORT=N also makes it listen for TLS (qemu+tls://) on 127.0.0.1:N, with the CA,
# certificate and key the caller put in DIR/pki (cacert.pem, servercert.pem, serverkey.pem; libvirt
# checks their key usages at startup); clients need a certificate signed by that CA (auth_tls = "none").
#
# LIBVIRTD_IDLE_TIMEOUT=N makes the daemon exit by itself N seconds after its last client left (while
# it runs no guest): a safety net for test runs that are killed before they can stop it.
#
# Keep DIR short: a unix socket path is at most 107 bytes, and DIR/sock/libvirt-sock-ro must fit.
set -euo pipefail

PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt qemu-system-x86 qemu-utils"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

die() { echo "libvirtd.sh: $*" >&2; exit 1; }

install_packages() {
  local missing="" p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086 # the list is meant to split
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  # libvirtd resolves its built-in qemu user and group before it reads qemu.conf, and fails to
  # start if they do not exist, even though qemu.conf then says root.
  getent group kvm >/dev/null || $SUDO groupadd -r kvm
  getent group libvirt-qemu >/dev/null || $SUDO groupadd -r libvirt-qemu
  id libvirt-qemu >/dev/null 2>&1 ||
    $SUDO useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
}

absdir() {
  [ -n "${1:-}" ] || die "missing DIR (usage: $0 start|stop|socket DIR)"
  mkdir -p "$1"
  (cd "$1" && pwd -P)
}

write_config() {
  local dir="$1"
  mkdir -p "$dir/etc" "$dir/run" "$dir/lib" "$dir/log" "$dir/cache" "$dir/sock"
  chmod 0700 "$dir/etc" "$dir/run" "$dir/lib" "$dir/log" "$dir/cache"
  # The socket is 0777 so that a non-root caller (when started through sudo) can use it; the
  # directories above it decide who can reach it.
  cat >"$dir/etc/libvirtd.conf" <<CONF
# Written by scripts/libvirtd.sh: a private daemon, reached only through unix sockets in $dir/sock.
unix_sock_dir = "$dir/sock"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0777"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
listen_tcp = 0
log_outputs = "3:stderr"
keepalive_interval = ${LIBVIRTD_KEEPALIVE_INTERVAL:-5}
keepalive_count = ${LIBVIRTD_KEEPALIVE_COUNT:-5}
CONF
  cat >"$dir/etc/qemu.conf" <<'CONF'
# Written by scripts/libvirtd.sh: run guests as root with no sandbox layers (no virtlogd, no cgroups).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
  if [ -n "${LIBVIRTD_TLS_PORT:-}" ]; then
    cat >>"$dir/etc/libvirtd.conf" <<CONF
listen_tls = 1
listen_addr = "127.0.0.1"
tls_port = "$LIBVIRTD_TLS_PORT"
auth_tls = "none"
ca_file = "$dir/pki/cacert.pem"
cert_file = "$dir/pki/servercert.pem"
key_file = "$dir/pki/serverkey.pem"
CONF
  else
    echo "listen_tls = 0" >>"$dir/etc/libvirtd.conf"
  fi
  printf 'uri_default = "qemu:///system"\n' >"$dir/etc/libvirt.conf"
}

daemon_pid() {
  local pidfile="$1/libvirtd.pid" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ -d "/proc/$pid" ] || return 1
  # Only our daemon: a recycled pid must never be signalled.
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/sbin/libvirtd ] || return 1
  echo "$pid"
}

start() {
  local dir sock pid
  dir="$(absdir "${1:-}")"
  sock="$dir/sock/libvirt-sock"
  [ "${#sock}" -le 104 ] || die "DIR too long for a unix socket path: $sock (${#sock} bytes; keep it under 104)"
  if pid="$(daemon_pid "$dir")"; then die "a daemon (pid $pid) already runs in $dir"; fi
  if [ -n "$SUDO" ]; then
    exec $SUDO -- env LIBVIRTD_KEEPALIVE_INTERVAL="${LIBVIRTD_KEEPALIVE_INTERVAL:-5}" \
      LIBVIRTD_KEEPALIVE_COUNT="${LIBVIRTD_KEEPALIVE_COUNT:-5}" \
      LIBVIRTD_IDLE_TIMEOUT="${LIBVIRTD_IDLE_TIMEOUT:-}" LIBVIRTD_TLS_PORT="${LIBVIRTD_TLS_PORT:-}" \
      "$0" start "$dir"
  fi
  case "${LIBVIRTD_KEEPALIVE_INTERVAL:-5}${LIBVIRTD_KEEPALIVE_COUNT:-5}${LIBVIRTD_IDLE_TIMEOUT:-}${LIBVIRTD_TLS_PORT:-}" in
    *[!0-9-]*) die "LIBVIRTD_KEEPALIVE_*, LIBVIRTD_IDLE_TIMEOUT and LIBVIRTD_TLS_PORT must be integers" ;;
  esac
  local extra=()
  if [ -n "${LIBVIRTD_IDLE_TIMEOUT:-}" ]; then extra+=(-t "$LIBVIRTD_IDLE_TIMEOUT"); fi
  if [ -n "${LIBVIRTD_TLS_PORT:-}" ]; then
    local f
    for f in cacert.pem servercert.pem serverkey.pem; do
      [ -f "$dir/pki/$f" ] || die "LIBVIRTD_TLS_PORT needs $dir/pki/$f"
    done
    extra+=(--listen)
  fi
  install_packages
  write_config "$dir"
  rm -f "$dir/libvirtd.pid" "$dir/sock/"libvirt*sock*
  mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
  # setsid: the daemon must not get the caller's terminal signals; unshare execs (no --fork), so
  # the process started here becomes libvirtd itself.
  setsid unshare --mount --propagation private -- /bin/sh -c '
    set -e
    mount --bind "$1/etc" /etc/libvirt
    mount --bind "$1/run" /run/libvirt
    mount --bind "$1/lib" /var/lib/libvirt
    mount --bind "$1/log" /var/log/libvirt
    mount --bind "$1/cache" /var/cache/libvirt
    dir="$1"; shift
    exec /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf -p "$dir/libvirtd.pid" "$@"
  ' sh "$dir" "${extra[@]}" </dev/null >>"$dir/libvirtd.log" 2>&1 &
  local child=$!
  # Ready once it answers a real call (the socket exists before the drivers are initialised).
  for _ in $(seq 150); do
    if ! kill -0 "$child" 2>/dev/null; then
      cat "$dir/libvirtd.log" >&2
      die "libvirtd exited during startup (log above, $dir/libvirtd.log)"
    fi
    if [ -S "$sock" ] && timeout 5 virsh -q -c "test+unix:///default?socket=$sock" uri >/dev/null 2>&1; then
      echo "$sock"
      return 0
    fi
    sleep 0.1
  done
  kill -KILL "$child" 2>/dev/null || true
  cat "$dir/libvirtd.log" >&2
  die "libvirtd did not answer within 15 s (log above)"
}

stop() {
  local dir pid ns p
  dir="$(absdir "${1:-}")"
  pid="$(daemon_pid "$dir")" || return 0
  if [ -n "$SUDO" ]; then exec $SUDO -- "$0" stop "$dir"; fi
  ns="$(readlink "/proc/$pid/ns/mnt")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  # Guests outlive their daemon (libvirt's design); here they must go with it. They are the
  # processes left in the daemon's mount namespace.
  for _ in $(seq 50); do
    local left=""
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] || continue
      left="$left ${p#/proc/}"
    done
    [ -n "$left" ] || break
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  rm -f "$dir/libvirtd.pid"
}

case "${1:-}" in
  install) if [ -n "$SUDO" ]; then exec $SUDO -- "$0" install; fi; install_packages ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  socket) echo "$(absdir "${2:-}")/sock/libvirt-sock" ;;
  *) die "usage: $0 install | start DIR | stop DIR | socket DIR" ;;
esac
