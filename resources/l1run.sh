#!/bin/bash
# l1run.sh [-a ASSET_DIR] [-m MEM_MB] [-t TIMEOUT_S] -- CMD ARGS...
#
# Runs CMD in the current directory inside an "L1" guest that has a real
# /dev/kvm, and exits with CMD's exit status (125 when L1 gave none).
# For hosts whose /dev/kvm cannot boot Linux (e.g. nested PVM KVM): QEMU in TCG
# mode emulates AMD SVM, and the L1 Debian kernel's kvm-amd gives L2 guests KVM.
# L1 sees the host's / read-only (9p) as its root (moved onto / as switch_root does), with tmpfs on /tmp
# and /run; the current directory is shared read-write at the same path.
# Assets (kernel, l1-initrd.gz) come from resources/assets.sh ASSET_DIR.
set -euo pipefail

usage() {
  echo "usage: $0 [-a ASSET_DIR] [-m MEM_MB] [-t TIMEOUT_S] -- CMD ARGS..." >&2
  exit 2
}

ASSETS=$PWD/target/e2e-assets
MEM=4096
TIMEOUT=1500
while [ $# -gt 0 ]; do
  case $1 in
    -a) [ $# -ge 2 ] || usage; ASSETS=$2; shift 2 ;;
    -m) [ $# -ge 2 ] || usage; MEM=$2; shift 2 ;;
    -t) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage

command -v qemu-system-x86_64 >/dev/null || {
  echo "l1run.sh: needs qemu-system-x86_64 (Debian package qemu-system-x86)" >&2
  exit 125
}
if [ ! -e "$ASSETS/vmlinuz" ] || [ ! -e "$ASSETS/l1-initrd.gz" ]; then
  "$(dirname "${BASH_SOURCE[0]}")/assets.sh" "$ASSETS" || exit 125
fi

W=$PWD
# The path travels on the L1 kernel command line and inside a quoted string.
case $W in
  *[!A-Za-z0-9/._+-]*)
    echo "l1run.sh: the current directory '$W' must not contain spaces or special characters" >&2
    exit 125 ;;
esac

# The command file that the L1 init sources with the host's /bin/sh (in the
# shared work dir): POSIX single quotes, since sh need not know bash's $'...'.
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
# One L1 guest at a time on this machine: it takes both cores, and runs share $PWD/.l1cmd,
# so the lock is held from before that file is written until the guest is gone.
exec 9>/tmp/nixvm-l1run.lock
if ! flock -n 9; then
  # Said now and then, so that a caller watching for a frozen L1 sees that it only waits.
  echo "l1run: waiting for another L1 run to finish"
  while ! flock -w 60 9; do echo "l1run: still waiting for another L1 run"; done
fi
CMDFILE=$W/.l1cmd
{
  printf 'export PATH='; shq "$PATH"; printf ' HOME='; shq "${HOME:-/root}"; echo
  while IFS= read -r v; do
    case $v in NIXVM_*|CLOUD_HYPERVISOR|FIRECRACKER) printf 'export %s=' "$v"; shq "${!v}"; echo ;; esac
  done < <(compgen -e)
  for a in "$@"; do shq "$a"; printf ' '; done
  echo
} > "$CMDFILE"

T=$(mktemp -d)
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  # Stop QEMU if we are interrupted while it runs.
  if [ -s "$T/qemu.pid" ]; then kill "$(cat "$T/qemu.pid")" 2>/dev/null || true; fi
  rm -rf "$T" "$CMDFILE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stream the console: drop QEMU's TCG feature warnings, the CR of CRLF line
# ends and the L1RC line, whose status is kept in $T/l1rc.
filter() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    if [[ $line == *"TCG doesn't support"* ]]; then
      continue
    elif [[ $line =~ ^(.*)L1RC=([0-9]+)$ ]]; then
      # The L1 init's status line (after the command's last, unended line).
      echo "${BASH_REMATCH[2]}" > "$T/l1rc"
      line=${BASH_REMATCH[1]}
      [ -z "$line" ] || printf '%s\n' "$line"
    else
      printf '%s\n' "$line"
    fi
  done
}

# QEMU's stderr goes to ours (less the TCG warnings), the console to filter. L1's kernel
# prints its emergencies (loglevel=1: a panic, a soft lockup), so that an L1 guest that stops
# by itself (a panic reboots it, and -no-reboot ends QEMU with status 0) says why; not more,
# since its lines share the console with the command's.
# In the background, so that a signal to this script can stop QEMU at once;
# fd 3 hands it our stdin (a background job would get /dev/null).
exec 3<&0 || exec 3</dev/null
{
  qrc=0
  timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 -M pc -accel tcg,thread=multi \
    -cpu EPYC,+svm,+npt -smp 2 -m "$MEM" \
    -display none -no-reboot -nodefaults -serial stdio -monitor none -pidfile "$T/qemu.pid" \
    -kernel "$ASSETS/vmlinuz" -initrd "$ASSETS/l1-initrd.gz" \
    -append "console=ttyS0 quiet loglevel=1 panic=-1 l1work=$W" \
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$W,mount_tag=work,security_model=none" \
    <&3 3<&- 2> >(grep -v "TCG doesn't support" >&2) || qrc=$?
  echo "$qrc" 2>/dev/null > "$T/qemu.rc" || true  # $T is gone if we were killed
} | filter &
wait $! || true

rc=$(cat "$T/l1rc" 2>/dev/null || true)
if [ -z "$rc" ]; then
  qrc=$(cat "$T/qemu.rc" 2>/dev/null || echo '?')
  if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "l1run.sh: no L1RC line: the L1 guest timed out after $TIMEOUT s" >&2
  else
    echo "l1run.sh: no L1RC line: the L1 guest stopped (QEMU exit status $qrc) before the command finished" >&2
  fi
  exit 125
fi
exit "$rc"
