# nixvm as the VM of NixOS tests (nixosModules.test). One line in a test,
#
#   defaults.imports = [ nixvm.nixosModules.test ];
#
# makes each node's `system.build.vm`, the start script (`run-<name>-vm`) the unmodified
# nixpkgs test driver runs, a nixvm runner made from the node's qemu-vm.nix options
# (qemu-vm-runner.nix). The driver's QEMU arguments (QMP, monitor, the backdoor's virtconsole,
# virtio-rng, -serial stdio, -no-reboot) reach nixvm after `--`, which maps them; $QEMU_OPTS
# too. The node's NICs keep the driver's naming: eth0 on nixvm's local network (QEMU's user
# network in the driver's runs), then each vlan's NIC on the driver's vde_switch with the MAC
# nixpkgs' test network gives it (its udev rules name the interfaces by MAC), so `block()`'s
# `set_link virtio-net-pci.1` reaches the first vlan's. The store is nixvm's own read-only
# virtio-fs share, xchg and the shared directory (copy_from_host, copy_from_vm) virtiofsd
# shares. Containers (systemd-nspawn nodes) have no qemu-vm.nix and are left alone.
{
  imports = [ ./options.nix ./qemu-vm-runner.nix ];
  virtualisation.nixvm.network = "test";
}
