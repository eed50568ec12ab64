#!/usr/bin/env bash
# dev.sh: nixvm's developer entry points, for a fresh Debian or Ubuntu machine.
#   resources/dev.sh demo   build nixvm and the test guest, boot it, show its console
#   resources/dev.sh test   format and lint checks, unit tests, end-to-end tests
#   resources/dev.sh deps   only install the system packages the two need
# System packages come from apt (as root, or through sudo); Rust from the machine's cargo.
# Guests boot directly on /dev/kvm where it can boot Linux, otherwise inside an L1 guest
# (QEMU with emulated AMD SVM: resources/l1run.sh), as resources/kvm-route.sh decides.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(qemu-system-x86 cpio xz-utils gzip kmod util-linux socat iproute2
  libcap-ng-dev libseccomp-dev pkg-config nix-bin qemu-utils gcc libc6-dev strace passt vde2
  mmdebstrap e2fsprogs)

log() { printf 'dev.sh: %s\n' "$*" >&2; }

deps() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The guest kernel and busybox are downloaded with apt-get download: apt must know them.
  if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
  fi
  command -v cargo >/dev/null || { log "cargo is missing: install Rust 1.85 or newer (https://rustup.rs)"; exit 2; }
}

# The upstream virtiofsd, for the virtio-fs tests.
virtiofsd_dep() {
  if ! command -v virtiofsd >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" ]; then
    log "installing virtiofsd (cargo install virtiofsd --locked)"
    cargo install virtiofsd --locked --quiet
  fi
}

demo() {
  deps
  cargo build --release -p nixvm
  resources/assets.sh target/e2e-assets
  local a=target/e2e-assets action=poweroff
  # With a terminal, the guest gives you a shell; 'poweroff -f' ends the VM.
  [ -t 0 ] && action=shell
  local cmd=(target/release/nixvm --kernel "$a/vmlinuz" --initrd "$a/initramfs.cpio.gz"
    --cpus 2 --memory 512M --cmdline "console=ttyS0 quiet panic=-1 nixvm.action=$action")
  local route
  route=$(resources/kvm-route.sh)
  case $route in
    direct) log "booting on /dev/kvm: ${cmd[*]}"; exec "${cmd[@]}" ;;
    l1) log "this /dev/kvm cannot boot Linux: booting inside an L1 guest (slow, software SVM)"
      exec resources/l1run.sh -- "${cmd[@]}" ;;
    *) log "cannot boot a guest here (${route#none: })"; exit 1 ;;
  esac
}

# Runs a step and says how long it took (CI machines differ several-fold in speed).
timed() {
  local start=$SECONDS
  "$@"
  log "$* took $((SECONDS - start)) s"
}

test_all() {
  timed deps
  timed virtiofsd_dep
  timed cargo fmt --all -- --check
  timed cargo clippy --workspace --all-targets -- -D warnings
  timed cargo test --workspace
  # Each fuzz target briefly (a smoke run); longer runs: resources/fuzz.sh SECONDS.
  timed resources/fuzz.sh 20
  timed resources/nix-tests.sh
}

case ${1:-} in
  deps) deps ;;
  demo) demo ;;
  test) test_all ;;
  *) echo "usage: $0 demo|test|deps" >&2; exit 2 ;;
esac
