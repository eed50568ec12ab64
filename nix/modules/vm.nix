# nixvm for `nixos-rebuild build-vm`: imported into any NixOS configuration (the flake's
# nixosModules.vm), it makes `virtualisation.vmVariant`'s `system.build.vm` (what
# `nixos-rebuild build-vm` and `config.system.build.vm` give) a nixvm runner instead of QEMU's,
# from the same qemu-vm.nix options:
#
#   memorySize, cores           --memory, --cpus
#   diskImage, diskSize         a persistent raw ext4 image (label nixos, serial root), created
#                               when missing; NIX_DISK_IMAGE overrides the path; default
#                               ./<name>.img (a qcow2 image of QEMU's is refused at start)
#   emptyDiskImages             raw images in the run directory, created when missing
#   sharedDirectories           virtio-fs instead of 9p: the host store (nix-store) served by
#                               nixvm itself, read-only; the others by a virtiofsd each
#   writableStore(UseTmpfs), mountHostNixStore   as qemu-vm.nix mounts them (on virtio-fs)
#   forwardPorts                through a passt nixvm starts (user networking, no root)
#   QEMU_KERNEL_PARAMS          appended to the kernel command line at run time
#   TMPDIR, USE_TMPDIR, SHARED_DIR   as qemu-vm.nix's runner uses them
#
# Options nixvm cannot honour fail evaluation of the runner, naming the option: graphics,
# useBootLoader, useEFIBoot, useNixStoreImage, tpm.enable, bios, restrictNetwork, useHostCerts,
# qemu.diskInterface other than virtio, interfaces. QEMU's own settings (qemu.options,
# qemu.networkingOptions, qemu.drives, qemu.package, msize, resolution) have no meaning here.
{
  imports = [ ./options.nix ];
  config.virtualisation.vmVariant.imports = [ ./qemu-vm-runner.nix ];
}
