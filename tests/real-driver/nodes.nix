# The machines of tests/real-driver/check.sh, as nixvm's test module (nix/modules/test.nix)
# renders test nodes (nix/modules/qemu-vm-runner.nix): eth0 `local` (QEMU's user network under the driver), eth1 a port on
# vlan 1's vde_switch ($QEMU_VDE_SOCKET_1, read when the script starts; the MAC nixpkgs'
# test network gives QEMU's NIC), the driver's shared directory on a virtiofsd, the systemd
# guest of resources/systemd-guest.sh with a disk of its own. One vCPU, as
# virtualisation.cores' default.
{ nixvm, kernel, initrd, dir, virtiofsd }:
let
  node = n: name: (import ../../nix/lib/runner.nix {
    inherit name nixvm kernel initrd virtiofsd;
    kernelParams = [ "console=ttyS0" "root=/dev/vda" "rw" "quiet" "panic=-1" ];
    vcpu = 1;
    mem = 768;
    volumes = [ { image = "${dir}/${name}.img"; } ];
    interfaces = [
      { type = "local"; id = "eth0"; }
      { type = "vde"; id = "eth1"; socketEnv = "QEMU_VDE_SOCKET_1"; mac = "52:54:00:12:01:0${toString n}"; }
    ];
    preStart = "ln -sfn \"$SHARED_DIR\" share-shared";
    shares = [ {
      tag = "shared"; source = "share-shared"; mountPoint = "/tmp/shared";
      backend = "virtiofsd"; socket = "virtiofs-shared.sock";
    } ];
    # Inside L1 the root is a chroot, where the namespace sandbox cannot pivot_root.
    virtiofsdArgs = [ "--sandbox" "chroot" "--log-level" "error" ];
    # As the test module: the driver's SIGTERM stops the machine at once; a reboot boots
    # again, unless the driver said -no-reboot.
    shutdownTimeout = 0;
    onReboot = "restart";
  }).script;
in
{
  a = node 1 "a";
  b = node 2 "b";
}
