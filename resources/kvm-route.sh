#!/bin/bash
# kvm-route.sh: how the end-to-end tests can boot a Linux guest here. Prints:
#   direct        /dev/kvm works and can boot a stock Linux kernel
#   l1            it cannot (e.g. nested PVM KVM), but QEMU can run an L1 guest
#                 with emulated SVM (resources/l1run.sh)
#   none: REASON  neither
# NIXVM_E2E_ROUTE=direct|l1|none overrides the probe. Always exits 0.
set -euo pipefail

case ${NIXVM_E2E_ROUTE:-} in
  direct | l1) echo "$NIXVM_E2E_ROUTE"; exit 0 ;;
  none) echo "none: NIXVM_E2E_ROUTE=none"; exit 0 ;;
  "") ;;
  *) echo "none: bad NIXVM_E2E_ROUTE '$NIXVM_E2E_ROUTE' (want direct or l1)"; exit 0 ;;
esac

# Why /dev/kvm cannot boot Linux; empty when it can.
why=
if [ ! -e /dev/kvm ]; then
  why="no /dev/kvm"
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  why="/dev/kvm not read-writable"
elif [ -e /sys/module/kvm_pvm ]; then
  # PVM emulates ring-0 guest code and fails on a stock kernel.
  why="/dev/kvm is nested PVM KVM"
elif ! grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null &&
  [ ! -e /sys/module/kvm_intel ] && [ ! -e /sys/module/kvm_amd ]; then
  why="no VT-x/AMD-V behind /dev/kvm"
fi

if [ -z "$why" ]; then
  echo direct
elif command -v qemu-system-x86_64 >/dev/null; then
  echo l1
else
  echo "none: $why and no qemu-system-x86_64"
fi
exit 0
