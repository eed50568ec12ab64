# virtualisation.nixvm.*: declared once for nixosModules.vm (at the configuration's top level,
# so that vmVariant sees them too) and nixosModules.test (on each test node).
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types literalExpression;
in
{
  options.virtualisation.nixvm = {
    package = mkOption {
      type = types.package;
      default = pkgs.nixvm or (throw "virtualisation.nixvm.package is not set (use nixvm's flake, or an overlay with pkgs.nixvm)");
      defaultText = literalExpression "pkgs.nixvm";
      description = "The nixvm that runs the VM (`nixos-rebuild build-vm`'s, or a test node).";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More nixvm arguments for the runner.";
    };
    transport = mkOption {
      type = types.enum [ "mmio" "pci" ];
      default = "pci";
      description = ''
        How the VM's virtio devices attach (--transport): "pci", virtio-pci functions with
        MSI-X, the bus QEMU gives these machines (qemu-vm.nix requires VIRTIO_PCI and names
        the NICs eth0, eth1, … itself: networking.usePredictableInterfaceNames = false), and
        nixvm's faster I/O; or "mmio", virtio-mmio (nixvm's own default).
      '';
    };
    network = mkOption {
      type = types.enum [ "user" "test" ];
      default = "user";
      internal = true;
      description = ''
        The machine's NICs: "user", one user-mode interface through passt (build-vm);
        "test", a NixOS test node's (eth0 on nixvm's local network, one NIC per vlan on the
        test driver's vde_switch). nixosModules.test sets "test".
      '';
    };
  };
}
