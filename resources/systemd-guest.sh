#!/usr/bin/env bash
# systemd-guest.sh ASSETS OUT: a real systemd guest for the e2e tests, the closest thing to
# NixOS that can be built here: Debian trixie (systemd 257, the generation NixOS ships)
# from mmdebstrap, with the test kernel's modules (ASSETS, from resources/assets.sh) and an
# initrd that Debian's own initramfs-tools makes for that kernel inside the tree.
#   OUT/root.img    ext4 (/dev/vda, mounted by the initrd: root=/dev/vda)
#   OUT/initrd.img        Debian's (MODULES=most)
#   OUT/initrd-small.img  the same with only the modules a NixOS VM's initrd has
# The guest runs nixvm-test.service once it is up (WantedBy=multi-user.target): it prints
# "NIXVM-TEST: ..." lines on ttyS0 (a credential, the RTC, its journal's warnings), sleeps,
# and says "unit-done" (then powers off with nixvm.action=poweroff on the kernel command
# line, reboots with nixvm.action=reboot); the default target is reached only after it. nixvm-backdoor.service
# runs a root shell on hvc0 as the NixOS test driver's backdoor does.
# Needs root, mmdebstrap and Debian's package mirror; does nothing when OUT is up to date
# (OUT/stamp: this script's hash and the kernel version).
set -euo pipefail
assets=$(realpath "$1")
out=$2
kver=$(cat "$assets/kver")
stamp="$(sha256sum "$0" | cut -c1-16)-$kver"
if [[ -f $out/stamp && $(cat "$out/stamp") == "$stamp" ]]; then
  exit 0
fi
skip() { echo "systemd-guest: skipped: $*" >&2; exit 77; }
[[ $(id -u) == 0 ]] || skip "building the root file system needs root"
command -v mmdebstrap >/dev/null || skip "no mmdebstrap (apt-get install mmdebstrap)"
command -v mkfs.ext4 >/dev/null || skip "no mkfs.ext4 (apt-get install e2fsprogs)"

rm -rf "$out"
mkdir -p "$out"
tree=$out/tree
mmdebstrap --quiet --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,kmod,initramfs-tools,zstd,iproute2,iputils-ping,netcat-openbsd \
  trixie "$tree"
mkdir -p "$tree/usr/lib/modules"
cp -a "$assets/root/lib/modules/$kver" "$tree/usr/lib/modules/"
cp "$assets/root/boot/config-$kver" "$tree/boot/"
chroot "$tree" depmod "$kver"
# The root is /dev/vda on virtio-mmio: both drivers in the initrd.
printf '%s\n' virtio_mmio virtio_blk ext4 >> "$tree/etc/initramfs-tools/modules"
chroot "$tree" mkinitramfs -o /boot/initrd.img "$kver"
mv "$tree/boot/initrd.img" "$out/initrd.img"
# A NixOS-sized initrd beside it: only the modules NixOS's qemu-guest profile and qemu-vm.nix
# put in a VM's initrd (and what they need), not Debian's MODULES=most (the driver bench
# boots both).
conf=$tree/etc/initramfs-tools
cp "$conf/initramfs.conf" "$conf/modules" "$out/"
sed -i 's/^MODULES=.*/MODULES=list/' "$conf/initramfs.conf"
printf '%s\n' virtio_net virtio_pci virtio_scsi 9p 9pnet_virtio virtiofs virtio_balloon \
  virtio_console virtio_rng virtio_gpu >> "$conf/modules"
chroot "$tree" mkinitramfs -o /boot/initrd.img "$kver"
mv "$tree/boot/initrd.img" "$out/initrd-small.img"
mv "$out/initramfs.conf" "$out/modules" "$conf/"

echo nixvm-guest > "$tree/etc/hostname"
# No password: the console is the test's.
chroot "$tree" passwd -d root >/dev/null
cat > "$tree/usr/local/bin/nixvm-test" <<'EOF'
#!/bin/sh
echo "NIXVM-TEST: unit-start"
echo "NIXVM-TEST: cred=$(cat /run/credentials/@system/nixvm.greeting 2>&1)"
echo "NIXVM-TEST: rtc=$(cat /sys/class/rtc/rtc0/name 2>&1)"
echo "NIXVM-TEST: powerkey=$(grep -l 'Power Button' /sys/class/input/input*/name 2>/dev/null | wc -l)"
# What the journal warns about, for a human to compare with QEMU's.
journalctl -b -p warning --no-pager -q -o cat | sed 's/^/NIXVM-TEST: journal: /'
sleep 5
echo "NIXVM-TEST: unit-done"
# nixvm.action= as the busybox test init reads it: the boot bench's guest powers off (or,
# for Firecracker, which ends on a reset, reboots) once it is up.
for a in $(cat /proc/cmdline); do
  case $a in
    nixvm.action=poweroff) systemctl poweroff --no-block ;;
    nixvm.action=reboot) systemctl reboot --no-block ;;
  esac
done
EOF
chmod +x "$tree/usr/local/bin/nixvm-test"
cat > "$tree/etc/systemd/system/nixvm-test.service" <<'EOF'
[Unit]
Description=nixvm e2e report
[Service]
Type=oneshot
ExecStart=/usr/local/bin/nixvm-test
StandardOutput=tty
TTYPath=/dev/ttyS0
[Install]
WantedBy=multi-user.target
EOF
# A root shell on hvc0, as the NixOS test driver's backdoor service runs it
# (nixos/modules/testing/test-instrumentation.nix): the test talks to it over
# nixvm's --console connect=.
cat > "$tree/usr/local/bin/nixvm-backdoor" <<'EOF'
#!/bin/bash
export HOME=/root
cd /tmp
exec < /dev/hvc0 > /dev/hvc0
while ! exec 2> /dev/ttyS0; do sleep 0.1; done
echo "connecting to host..." >&2
stty -F /dev/hvc0 raw -echo
echo "Spawning backdoor root shell..."
PS1="" exec /usr/bin/env bash --norc /dev/hvc0
EOF
chmod +x "$tree/usr/local/bin/nixvm-backdoor"
cat > "$tree/etc/systemd/system/nixvm-backdoor.service" <<'EOF'
[Unit]
Description=root shell on hvc0 for the test
Requires=dev-hvc0.device dev-ttyS0.device
After=dev-hvc0.device dev-ttyS0.device
[Service]
ExecStart=/usr/local/bin/nixvm-backdoor
KillSignal=SIGHUP
[Install]
WantedBy=multi-user.target
EOF
# As a NixOS test node: the driver's shared directory on /tmp/shared (qemu-vm.nix's
# fileSystems entry), and the first NIC (nixvm's --net local, QEMU's user network in the
# driver) configured by DHCP; the vlan NICs are the test's.
mkdir -p "$tree/tmp/shared"
echo "shared /tmp/shared virtiofs nofail,x-systemd.device-timeout=5s 0 0" >> "$tree/etc/fstab"
mkdir -p "$tree/etc/systemd/network"
printf '[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n' > "$tree/etc/systemd/network/10-eth0.network"
chroot "$tree" systemctl enable systemd-networkd >/dev/null 2>&1
# No getty on the consoles: its vhangup() would cut the unit's output off, and hvc0 is the
# backdoor's.
ln -sf /dev/null "$tree/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$tree/etc/systemd/system/serial-getty@hvc0.service"
mkdir -p "$tree/etc/systemd/system/multi-user.target.wants"
ln -sf ../nixvm-test.service "$tree/etc/systemd/system/multi-user.target.wants/"
ln -sf ../nixvm-backdoor.service "$tree/etc/systemd/system/multi-user.target.wants/"
rm -rf "$tree/var/cache/apt" "$tree/var/lib/apt/lists"
mkfs.ext4 -q -L root -d "$tree" "$out/root.img" 1G
rm -rf "$tree"
# On disk before the boots start: no writeback competing with the L1 guest.
sync
echo "$stamp" > "$out/stamp"
