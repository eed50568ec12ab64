#!/usr/bin/env bash
# check.sh: two nixvm machines (tests/real-driver/nodes.nix: the systemd guest of
# resources/systemd-guest.sh, as nixvm's test module renders test nodes) driven by nixpkgs'
# own test driver code (its machine and vlan modules, from NIXVM_TEST_DRIVER, a checkout's
# nixos/lib/test-driver/src) through tests/real-driver/test.py. Runs where /dev/kvm boots
# Linux (here: inside L1). Exit 0 when every check passed, 77 when it cannot run here.
# Environment: NIXVM_TEST_DRIVER; PYTHON (>= 3.13, as the driver wants; python3);
# NIXVM (target/debug/nixvm); NIXVM_VIRTIOFSD (virtiofsd on PATH).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
skip() { echo "real-driver: skipped: $*"; exit 77; }
[ -n "${NIXVM_TEST_DRIVER:-}" ] || skip "NIXVM_TEST_DRIVER is not set (a checkout of nixpkgs' nixos/lib/test-driver/src)"
[ -d "$NIXVM_TEST_DRIVER/test_driver/machine" ] || skip "$NIXVM_TEST_DRIVER has no test_driver/machine"
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 13))' || skip "$py is older than Python 3.13, which the driver needs"
nixvm=${NIXVM:-$root/target/debug/nixvm}
virtiofsd=${NIXVM_VIRTIOFSD:-$(command -v virtiofsd || true)}
guest=$root/target/systemd-guest
for need in "$nixvm" "$virtiofsd" "$guest/stamp" "$root/target/e2e-assets/vmlinuz"; do
  [ -e "$need" ] || skip "$need is missing"
done
command -v vde_switch >/dev/null || skip "no vde_switch"
command -v nix >/dev/null || skip "no nix (to render the start scripts)"

work=$(mktemp -d /tmp/nixvm-real-driver.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out" "$work/tmp"
for m in a b; do
  cp --sparse=always "$guest/root.img" "$work/$m.img"
  nix --extra-experimental-features nix-command --store dummy:// eval --impure --raw --expr "
    (import $root/tests/real-driver/nodes.nix {
      nixvm = \"$nixvm\"; kernel = \"$root/target/e2e-assets/vmlinuz\";
      initrd = \"$guest/initrd.img\"; dir = \"$work\"; virtiofsd = \"$virtiofsd\";
    }).$m" > "$work/run-$m-vm"
  chmod +x "$work/run-$m-vm"
done
cd "$work"
run=("$py" "$root/tests/real-driver/driver.py" "$work/out" "$root/tests/real-driver/test.py"
  "$work/run-a-vm" "$work/run-b-vm")
# The driver starts each machine with /bin/sh -c and ends it with SIGTERM to that process. In
# the Nix build sandbox /bin/sh is bash, which execs the start script, so the signal reaches
# it; Debian's dash would stay in between and take the signal alone (QEMU's machines as
# nixvm's kept running). Here /bin/sh is bash too, in a mount namespace of the check's own.
if [ "$(readlink -f /bin/sh)" != "$(readlink -f "$(command -v bash)")" ]; then
  [ "$(id -u)" = 0 ] || skip "/bin/sh is not bash, and only root can bind bash over it"
  run=(unshare -m bash -c 'mount --bind "$(command -v bash)" /bin/sh && exec "$@"' real-driver
    "${run[@]}")
fi
TMPDIR=$work/tmp "${run[@]}"
