#!/usr/bin/env bash
# nix-runner-boot.sh: the runner script nix/lib/runner.nix generates boots a fake NixOS
# toplevel and powers off.
#   resources/nix-runner-boot.sh [--render-only] DIR
# Makes DIR/system (kernel -> target/e2e-assets/vmlinuz, initrd -> initramfs.cpio.gz, init,
# kernel-params with `quiet nixvm.action=poweroff`), renders the runner as the guest module
# would (<kernel-params> init=<system>/init regInfo=… console=ttyS0 reboot=k panic=-1, its
# devices on virtio-pci) into
# DIR/bin/run-fake-vm, then (unless --render-only) runs it in DIR with NIXVM (default
# target/debug/nixvm) and expects exit 0 and the guest's "NIXVM-TEST: poweroff" marker.
# The console goes to DIR/console.log and stdout. Needs nix-instantiate and a KVM that
# boots Linux (the caller picks the route: run it inside resources/l1run.sh where needed).
# Exit: 0 ok, 1 failed, 77 skipped (no nix, no assets).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
render_only=
[ "${1:-}" = --render-only ] && { render_only=1; shift; }
[ $# -eq 1 ] || { echo "usage: $0 [--render-only] DIR" >&2; exit 2; }
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
ASSETS=${NIXVM_ASSETS:-$ROOT/target/e2e-assets}
NIXVM=${NIXVM:-$ROOT/target/debug/nixvm}
case $NIXVM in /*) ;; *) NIXVM=$ROOT/$NIXVM ;; esac

command -v nix-instantiate >/dev/null || { echo "skipped: nix-instantiate is not installed" >&2; exit 77; }
[ -f "$ASSETS/vmlinuz" ] && [ -f "$ASSETS/initramfs.cpio.gz" ] ||
  { echo "skipped: no $ASSETS (resources/assets.sh)" >&2; exit 77; }

# The fake toplevel: what a NixOS system.build.toplevel holds, as far as the runner reads it.
sys=$DIR/system
mkdir -p "$sys"
ln -sfn "$ASSETS/vmlinuz" "$sys/kernel"
ln -sfn "$ASSETS/initramfs.cpio.gz" "$sys/initrd"
printf '#!/bin/sh\n# the test initramfs runs its own /init; this one is only named on the command line\nexec /init\n' > "$sys/init"
chmod +x "$sys/init"
printf 'quiet nixvm.action=poweroff' > "$sys/kernel-params"
mkdir -p "$DIR/closure-info"
: > "$DIR/closure-info/registration"

nstr() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\$/\\\$}; printf '"%s"' "$s"; }
mkdir -p "$DIR/bin"
nix --extra-experimental-features nix-command --store dummy:// eval --impure --raw --expr "
  let
    sys = $(nstr "$sys");
    params = builtins.filter builtins.isString (builtins.split \" \" (builtins.readFile (sys + \"/kernel-params\")));
  in ((import $(nstr "$ROOT/nix/lib/runner.nix")) {
    name = \"fake\";
    kernel = sys + \"/kernel\";
    initrd = sys + \"/initrd\";
    kernelParams = params ++ [ \"init=\${sys}/init\" \"regInfo=$(printf '%s' "$DIR")/closure-info/registration\" ];
    mem = 256;
    serial = \"stdio\";
    socket = \"fake.sock\";
    transport = \"pci\";
  }).script" > "$DIR/bin/run-fake-vm"
chmod +x "$DIR/bin/run-fake-vm"
echo "rendered $DIR/bin/run-fake-vm" >&2
[ -n "$render_only" ] && exit 0

set +e
(cd "$DIR" && NIXVM=$NIXVM ./bin/run-fake-vm </dev/null) 2>&1 | tee "$DIR/console.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then echo "FAILED: run-fake-vm exited $rc, want 0" >&2; exit 1; fi
grep -q "NIXVM-TEST: poweroff" "$DIR/console.log" || { echo "FAILED: no NIXVM-TEST: poweroff" >&2; exit 1; }
grep -q "NIXVM-TEST: cmdline=.*init=$sys/init regInfo=" "$DIR/console.log" ||
  { echo "FAILED: the guest's /proc/cmdline lacks init=$sys/init regInfo=…" >&2; exit 1; }
echo "ok: the rendered runner booted the fake toplevel and the guest powered off"
