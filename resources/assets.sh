#!/bin/bash
# assets.sh OUT_DIR: fetch and build the end-to-end test assets.
#
# Everything comes from the Debian package registry (apt-get download):
#   debs/               the kernel (linux-image-<ver>-amd64) and busybox-static .debs
#   root/               dpkg -x of the kernel package, with depmod run on it
#   kver                the kernel version string
#   vmlinuz             the kernel bzImage
#   vmlinux             the uncompressed ELF kernel (PVH entry note) from the bzImage
#   busybox             the static busybox binary
#   initramfs.cpio.gz   the test guest's initramfs (/init = resources/guest-init)
#   l1-initrd.gz        the initrd of the L1 guest that resources/l1run.sh boots
# Idempotent: work whose output is newer than its inputs is skipped.
set -euo pipefail

# Modules the test guest loads (with their dependencies).
GUEST_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net virtio_rng virtio_console virtiofs vmw_vsock_virtio_transport button evdev"
# Modules the L1 guest loads: KVM on emulated SVM, 9p for the host's files, VMM backends,
# loop devices (the block bench's image).
L1_MODULES="kvm-amd 9p 9pnet_virtio virtio_pci tun vhost_net vhost_vsock overlay fuse virtio_net loop"

die() { echo "assets.sh: $*" >&2; exit 1; }
warn() { echo "assets.sh: warning: $*" >&2; }
log() { echo "assets.sh: $*" >&2; }

[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
GUEST_INIT=$HERE/guest-init
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

# depmod/modprobe live in sbin, which a normal user's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin
for t in apt-cache apt-get dpkg-deb depmod modprobe xz gzip cpio grep; do
  command -v "$t" >/dev/null || die "needs '$t' (Debian packages: apt kmod xz-utils gzip cpio)"
done
[ -r "$GUEST_INIT" ] || die "missing $GUEST_INIT"

# fresh OUTPUT INPUT...: true when OUTPUT exists and is newer than every INPUT.
fresh() {
  local o=$1 i
  shift
  [ -e "$o" ] || return 1
  for i in "$@"; do [ "$o" -nt "$i" ] || return 1; done
}

# The versioned kernel package behind the linux-image-amd64 meta package.
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' || true
}

mkdir -p "$OUT/debs"
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ]; then
  # No apt lists: reuse a kernel deb that is already here, else refresh the lists.
  KDEB=$(find "$OUT/debs" -maxdepth 1 -name 'linux-image-[0-9]*.deb' | sort -V | tail -n1)
  if [ -n "$KDEB" ]; then
    KPKG=$(basename "$KDEB"); KPKG=${KPKG%%_*}
  elif [ "$(id -u)" -eq 0 ]; then
    log "apt has no linux-image-amd64; running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    KPKG=$(kernel_pkg)
  fi
  [ -n "$KPKG" ] || die "apt-cache knows no linux-image-amd64 (a Debian package): run 'apt-get update' as root first"
fi

# As root, apt would warn that its _apt sandbox user cannot write to debs/.
APT_OPTS=()
[ "$(id -u)" -ne 0 ] || APT_OPTS=(-o APT::Sandbox::User=root)

# download PKG: the .deb of PKG in debs/ (fetched once).
download() {
  local pkg=$1 deb
  deb=$(find "$OUT/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1)
  if [ -z "$deb" ]; then
    log "downloading $pkg"
    (cd "$OUT/debs" && apt-get download -q "${APT_OPTS[@]}" "$pkg" >&2) || die "apt-get download $pkg failed"
    deb=$(find "$OUT/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1)
    [ -n "$deb" ] || die "apt-get download $pkg gave no .deb"
  fi
  echo "$deb"
}
KDEB=$(download "$KPKG")
BDEB=$(download busybox-static)
# Drop kernel debs that the meta package no longer points to.
find "$OUT/debs" -maxdepth 1 -name 'linux-image-[0-9]*.deb' ! -path "$KDEB" -delete

# root/: the unpacked kernel package, with module dependency tables.
if ! fresh "$OUT/root/.stamp" "$KDEB" || [ "$(cat "$OUT/root/.stamp")" != "$(basename "$KDEB")" ]; then
  log "unpacking $(basename "$KDEB")"
  rm -rf "$OUT/root"
  dpkg-deb -x "$KDEB" "$OUT/root"
  basename "$KDEB" > "$OUT/root/.stamp"
fi
KVER=$(find "$OUT/root/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n1)
if [ -z "$KVER" ] || [ ! -e "$OUT/root/boot/vmlinuz-$KVER" ]; then die "no kernel in $KDEB"; fi
if ! fresh "$OUT/root/lib/modules/$KVER/modules.dep" "$OUT/root/.stamp"; then
  depmod -b "$OUT/root" "$KVER"
fi
[ "$(cat "$OUT/kver" 2>/dev/null)" = "$KVER" ] || echo "$KVER" > "$OUT/kver"

# vmlinuz: a copy of the bzImage.
if ! fresh "$OUT/vmlinuz" "$OUT/root/.stamp"; then
  cp "$OUT/root/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
  mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
fi

# vmlinux: the xz stream inside the bzImage, decompressed (as linux's
# scripts/extract-vmlinux does: try each xz magic until one gives an ELF).
is_elf() { [ "$(head -c4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }
if ! fresh "$OUT/vmlinux" "$OUT/vmlinuz"; then
  log "extracting vmlinux"
  ok=
  while IFS=: read -r pos _; do
    tail -c+"$((pos + 1))" "$OUT/vmlinuz" | xz -dc --single-stream > "$OUT/vmlinux.tmp" 2>/dev/null || true
    if is_elf "$OUT/vmlinux.tmp"; then ok=1; break; fi
  done < <(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$OUT/vmlinuz")
  [ -n "$ok" ] || { rm -f "$OUT/vmlinux.tmp"; die "no xz-compressed ELF found in $OUT/vmlinuz"; }
  mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
fi

# busybox: the static binary from busybox-static.
if ! fresh "$OUT/busybox" "$BDEB"; then
  tmp=$(mktemp -d)
  dpkg-deb -x "$BDEB" "$tmp"
  cp "$tmp/bin/busybox" "$OUT/busybox.tmp"
  rm -rf "$tmp"
  chmod 755 "$OUT/busybox.tmp"
  mv "$OUT/busybox.tmp" "$OUT/busybox"
fi

# add_modules DIR MODULE...: copy MODULEs and their dependencies (uncompressed)
# into DIR, in load order, and list their file names in DIR/order.
add_modules() {
  local dir=$1 m f name out
  shift
  mkdir -p "$dir"
  : > "$dir/order"
  for m in "$@"; do
    if ! out=$(modprobe -C /dev/null -d "$OUT/root" -S "$KVER" --show-depends "$m" 2>&1); then
      warn "module $m not found in $KVER: skipped"
      continue
    fi
    # "builtin NAME" lines need nothing; "insmod PATH [OPTS]" lines do.
    while read -r f; do
      name=$(basename "$f")
      case $name in
        *.ko.xz) name=${name%.xz}; [ -e "$dir/$name" ] || xz -dc "$f" > "$dir/$name" ;;
        *.ko.gz) name=${name%.gz}; [ -e "$dir/$name" ] || gzip -dc "$f" > "$dir/$name" ;;
        *.ko.zst) name=${name%.zst}; [ -e "$dir/$name" ] || zstd -qdc "$f" > "$dir/$name" ;;
        *) [ -e "$dir/$name" ] || cp "$f" "$dir/$name" ;;
      esac
      grep -qxF "$name" "$dir/order" || echo "$name" >> "$dir/order"
    done < <(awk '$1=="insmod"{print $2}' <<< "$out")
  done
}

# pack DIR OUTFILE: DIR as a gzip'd newc cpio archive owned by root, with
# fixed mtimes so that equal inputs give an equal archive.
pack() {
  find "$1" -exec touch -h -d @0 {} +
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n > "$2.tmp"
  mv "$2.tmp" "$2"
}

# initramfs.cpio.gz: busybox, guest-init as /init, the virtio modules.
if ! fresh "$OUT/initramfs.cpio.gz" "$OUT/root/.stamp" "$OUT/busybox" "$GUEST_INIT" "$SELF"; then
  log "building initramfs.cpio.gz"
  tmp=$(mktemp -d)
  mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
  cp "$OUT/busybox" "$tmp/bin/busybox"
  cp "$GUEST_INIT" "$tmp/init"
  chmod 755 "$tmp/init" "$tmp/bin/busybox"
  # shellcheck disable=SC2086 # word splitting of the module list is meant
  add_modules "$tmp/lib/modules" $GUEST_MODULES
  pack "$tmp" "$OUT/initramfs.cpio.gz"
  rm -rf "$tmp"
fi

# l1-initrd.gz: busybox, the L1 modules, and an init that chroots into the
# host's / (9p, read-only) and runs the work dir's .l1cmd (see l1run.sh).
if ! fresh "$OUT/l1-initrd.gz" "$OUT/root/.stamp" "$OUT/busybox" "$SELF"; then
  log "building l1-initrd.gz"
  tmp=$(mktemp -d)
  mkdir -p "$tmp"/{bin,dev,proc,sys,host}
  cp "$OUT/busybox" "$tmp/bin/busybox"
  # shellcheck disable=SC2086 # word splitting of the module list is meant
  add_modules "$tmp/mod" $L1_MODULES
  cat > "$tmp/init" <<'INIT'
#!/bin/busybox sh
# L1 init: load modules, make the host's / the root and run the work dir's .l1cmd.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
$B mount -t sysfs sys /sys
while read -r m; do $B insmod "/mod/$m" >/dev/null 2>&1; done < /mod/order
$B ip link set lo up >/dev/null 2>&1
O=trans=virtio,version=9p2000.L,msize=524288
$B mount -t 9p -o "$O,ro,cache=loose" host /host
$B mount -t tmpfs tmp /host/tmp
$B mount -t tmpfs run /host/run
$B mount --bind /dev /host/dev
$B mount -t proc proc /host/proc
$B mount -t sysfs sys /host/sys
$B mkdir -p /host/dev/pts /host/dev/shm
$B mount -t devpts pts /host/dev/pts
$B mount -t tmpfs shm /host/dev/shm
W=$($B sed -n 's/.*l1work=\([^ ]*\).*/\1/p' /proc/cmdline)
$B mkdir -p "/host$W" 2>/dev/null
$B mount -t 9p -o "$O" work "/host$W"
# The host's / becomes the root as switch_root makes it (moved onto /, then chrooted into):
# a process merely chrooted into a directory may not create user namespaces, which passt's
# sandbox needs. This shell keeps the initramfs as its root, so $B stays where it is.
cd /host
$B mount --move . /
$B chroot . /bin/sh -c "cd '$W' && . ./.l1cmd"
echo "L1RC=$?"
$B sync
$B poweroff -f
INIT
  chmod 755 "$tmp/init" "$tmp/bin/busybox"
  pack "$tmp" "$OUT/l1-initrd.gz"
  rm -rf "$tmp"
fi
