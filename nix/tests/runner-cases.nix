# VM descriptions for nix/lib/runner.nix and the nixvm argv each must give
# (resources/nix-tests.sh evaluates them, compares, and runs each argv with --dry-run in
# `dir`, where it made the images a.img, b.img and c.img of 1 MiB and the directories sock/
# and ro/). A case with `error` must fail to evaluate with that text in the message. A case
# may list strings its runner script must hold (`scriptHas`) and must not (`scriptLacks`).
{ assets, dir }:
let
  kernel = "${assets}/vmlinuz";
  initrd = "${assets}/initramfs.cpio.gz";
  k = [ "--kernel" kernel ];
  tail = [ "--cpus" "1" "--memory" "512M" ];
  defaultCmdline = "console=ttyS0 reboot=k panic=-1";
in
{
  # Only the kernel: microvm.nix's defaults (1 vCPU, 512 MiB, socket <name>.sock).
  minimal = {
    desc = { inherit kernel; };
    argv = [ "nixvm" ] ++ k ++ [ "--cmdline" defaultCmdline ] ++ tail
      ++ [ "--api-socket" "nixvm.sock" ];
  };

  # What the guest module generates for a NixOS system.
  nixos = {
    desc = {
      name = "web";
      nixvm = "/nix/store/00000000000000000000000000000000-nixvm-0.1.0/bin/nixvm";
      inherit kernel initrd;
      vcpu = 2;
      mem = 1024;
      kernelParams = [
        "loglevel=4"
        "init=/nix/store/3m6ai0zm3rg7a2z1s2ad1xfzdc0wz6kn-nixos-system-web-24.11/init"
        "regInfo=/nix/store/ijgclfphrd1vzk6qvbwzy0mbcgqnfzgf-closure-info/registration"
      ];
      socket = "${dir}/sock/web.sock";
      onReboot = "restart";
    };
    argv = [ "/nix/store/00000000000000000000000000000000-nixvm-0.1.0/bin/nixvm" ] ++ k
      ++ [ "--initrd" initrd
        "--cmdline" "loglevel=4 init=/nix/store/3m6ai0zm3rg7a2z1s2ad1xfzdc0wz6kn-nixos-system-web-24.11/init regInfo=/nix/store/ijgclfphrd1vzk6qvbwzy0mbcgqnfzgf-closure-info/registration ${defaultCmdline}"
        "--cpus" "2" "--memory" "1024M"
        "--api-socket" "${dir}/sock/web.sock" "--on-reboot" "restart" ];
  };

  # Volumes: order, readOnly, serial, direct; microvm.nix's extra attributes are ignored.
  volumes = {
    desc = {
      inherit kernel;
      socket = null;
      volumes = [
        { image = "${dir}/a.img"; mountPoint = "/var"; size = 1; fsType = "ext4"; }
        { image = "b.img"; readOnly = true; serial = "store"; }
        { image = "${dir}/c.img"; direct = true; serial = "data-1"; readOnly = false; label = "data"; }
      ];
    };
    argv = [ "nixvm" ] ++ k ++ [ "--cmdline" defaultCmdline ] ++ tail ++ [
      "--disk" "path=${dir}/a.img"
      "--disk" "path=b.img,readonly=on,serial=store"
      "--disk" "path=${dir}/c.img,serial=data-1,direct=on"
    ];
  };

  # Interfaces: TAPs by name (with and without a MAC), macvtaps as inherited fds from 3 on.
  interfaces = {
    desc = {
      name = "net";
      inherit kernel;
      interfaces = [
        { type = "tap"; id = "vm-net-a"; mac = "02:00:00:00:00:01"; }
        { type = "macvtap"; id = "vm-net-m1"; mac = "02:00:00:00:00:02"; macvtap = { link = "eth0"; mode = "bridge"; }; }
        { type = "tap"; id = "vm-net-b"; }
        { type = "macvtap"; id = "vm-net-m2"; mac = "02:00:00:00:00:03"; }
      ];
    };
    argv = [ "nixvm" ] ++ k ++ [ "--cmdline" defaultCmdline ] ++ tail ++ [
      "--net" "tap=vm-net-a,mac=02:00:00:00:00:01"
      "--net" "fd=3,mac=02:00:00:00:00:02"
      "--net" "tap=vm-net-b"
      "--net" "fd=4,mac=02:00:00:00:00:03"
      "--api-socket" "net.sock"
    ];
  };

  # Shares, one of each: a read-only one as the store share is (nixvm serves it: path=, no
  # socket, no virtiofsd) and a writable data share (a virtiofsd on its socket, which the
  # script starts); a read-only share given to a virtiofsd explicitly (--readonly), with
  # microvm.nix's default socket name.
  shares = {
    desc = {
      name = "fs";
      inherit kernel initrd;
      shares = [
        { tag = "ro-store"; source = "${dir}/ro"; mountPoint = "/nix/.ro-store"; proto = "virtiofs"; readOnly = true; }
        { tag = "data"; source = "/srv/data"; mountPoint = "/data"; socket = "${dir}/sock/data.sock"; }
        { tag = "docs"; source = "/usr/share/doc"; mountPoint = "/docs"; readOnly = true; backend = "virtiofsd"; }
      ];
    };
    argv = [ "nixvm" ] ++ k ++ [ "--initrd" initrd "--cmdline" defaultCmdline ] ++ tail ++ [
      "--fs" "tag=ro-store,path=${dir}/ro,readonly=on"
      "--fs" "tag=data,socket=${dir}/sock/data.sock"
      "--fs" "tag=docs,socket=fs-virtiofs-docs.sock"
      "--api-socket" "fs.sock"
    ];
    scriptHas = [
      "'virtiofsd' '--socket-path=${dir}/sock/data.sock' '--shared-dir=/srv/data' &"
      "'virtiofsd' '--socket-path=fs-virtiofs-docs.sock' '--shared-dir=/usr/share/doc' '--readonly' &"
      "kill $virtiofsd_pids"
    ];
    scriptLacks = [ "--shared-dir=${dir}/ro" "fs-virtiofs-ro-store.sock" ];
  };

  # Only a read-only share: nixvm serves it, nothing else runs; the script execs nixvm.
  share-readonly = {
    desc = {
      name = "ro";
      inherit kernel;
      shares = [ { tag = "ro-store"; source = "${dir}/ro"; mountPoint = "/nix/.ro-store"; readOnly = true; } ];
    };
    argv = [ "nixvm" ] ++ k ++ [ "--cmdline" defaultCmdline ] ++ tail ++ [
      "--fs" "tag=ro-store,path=${dir}/ro,readonly=on"
      "--api-socket" "ro.sock"
    ];
    scriptHas = [ "exec \"$NIXVM\" '--kernel'" ];
    scriptLacks = [ "virtiofsd_pids" "--shared-dir" "NIXVM_SKIP_VIRTIOFSD:-0" "ro-virtiofs-ro-store.sock" ];
  };

  # nixvm's own settings, kernelParams as one string, extra arguments.
  settings = {
    desc = {
      inherit kernel;
      kernelParams = "quiet nixvm.action=poweroff";
      bootParams = [ "console=ttyS0" ];
      vcpu = 4;
      mem = 2048;
      serial = "file=${dir}/console.log";
      console = "connect=${dir}/shell.sock";
      rng = false;
      shutdownTimeout = 10;
      onReboot = "exit";
      transport = "pci";
      socket = "${dir}/sock/ctl.sock";
      extraArgs = [ "--disk" "path=${dir}/a.img,readonly=on" ];
    };
    argv = [ "nixvm" ] ++ k ++ [
      "--cmdline" "quiet nixvm.action=poweroff console=ttyS0"
      "--cpus" "4" "--memory" "2048M"
      "--serial" "file=${dir}/console.log"
      "--console" "connect=${dir}/shell.sock"
      "--rng" "off"
      "--api-socket" "${dir}/sock/ctl.sock"
      "--shutdown-timeout" "10"
      "--on-reboot" "exit"
      "--transport" "pci"
      "--disk" "path=${dir}/a.img,readonly=on"
    ];
  };

  # qemu-vm.nix's QEMU_KERNEL_PARAMS, and a volume created without a file system
  # (virtualisation.emptyDiskImages).
  kernel-params-env = {
    desc = { inherit kernel; socket = null; cmdlineEnv = "QEMU_KERNEL_PARAMS";
      volumes = [ { image = "${dir}/c.img"; size = 4; fsType = null; } ]; };
    argv = [ "nixvm" ] ++ k ++ [ "--cmdline" defaultCmdline ] ++ tail ++ [ "--disk" "path=${dir}/c.img" ];
    scriptHas = [
      "'--cmdline' '${defaultCmdline}'\"\${QEMU_KERNEL_PARAMS:+ $QEMU_KERNEL_PARAMS}\" '--cpus'"
      "truncate -s '4M' '${dir}/c.img'"
    ];
    scriptLacks = [ "mkfs" ];
  };

  # Descriptions nixvm cannot run fail at evaluation, saying why.
  no-kernel = { desc = { name = "x"; }; error = "`kernel` is required"; };
  bad-transport = { desc = { inherit kernel; transport = "isa"; }; error = "transport must be mmio or pci"; };
  share-9p = {
    desc = { inherit kernel; shares = [ { tag = "s"; source = "/srv"; mountPoint = "/s"; proto = "9p"; } ]; };
    error = "nixvm serves only virtiofs shares";
  };
  share-nixvm-writable = {
    desc = { inherit kernel; shares = [ { tag = "s"; source = "/srv"; mountPoint = "/s"; backend = "nixvm"; } ]; };
    error = "backend nixvm serves only read-only shares";
  };
  share-bad-backend = {
    desc = { inherit kernel; shares = [ { tag = "s"; source = "/srv"; mountPoint = "/s"; readOnly = true; backend = "9p"; } ]; };
    error = "backend must be nixvm or virtiofsd, not 9p";
  };
  share-comma-source = {
    desc = { inherit kernel; shares = [ { tag = "s"; source = "/srv/a,b"; mountPoint = "/s"; readOnly = true; } ]; };
    error = "share source `/srv/a,b` contains a comma";
  };
  # microvm.nix's and QEMU's user networking: a passt nixvm starts, with the forwarded
  # ports on the first user interface.
  user-net = {
    desc = {
      inherit kernel;
      socket = null;
      passt = "/nix/store/00000000000000000000000000000000-passt/bin/passt";
      interfaces = [ { type = "user"; id = "u"; mac = "02:00:00:00:00:09"; } { type = "user"; id = "v"; } ];
      forwardPorts = [
        { from = "host"; host.port = 2222; guest.port = 22; }
        { proto = "udp"; host.address = "127.0.0.1"; host.port = 5353; guest.port = 53; }
      ];
    };
    argv = [ "nixvm" ] ++ k ++ [ "--cmdline" defaultCmdline ] ++ tail ++ [
      "--net" "passt=/nix/store/00000000000000000000000000000000-passt/bin/passt,forward=2222:22+udp:127.0.0.1/5353:53,mac=02:00:00:00:00:09"
      "--net" "passt=/nix/store/00000000000000000000000000000000-passt/bin/passt"
    ];
  };
  forward-without-user = {
    desc = { inherit kernel; forwardPorts = [ { host.port = 2222; guest.port = 22; } ]; };
    error = "forwardPorts needs an interface of type \"user\"";
  };
  forward-from-guest = {
    desc = { inherit kernel; interfaces = [ { type = "user"; id = "u"; } ];
      forwardPorts = [ { from = "guest"; host.port = 80; guest.port = 80; guest.address = "10.0.2.100"; } ]; };
    error = "guest-to-host forwarding";
  };
  forward-bad-port = {
    desc = { inherit kernel; interfaces = [ { type = "user"; id = "u"; } ];
      forwardPorts = [ { host.port = 70000; guest.port = 22; } ]; };
    error = "host port must be 1 to 65535";
  };
  bridge-net = {
    desc = { inherit kernel; interfaces = [ { type = "bridge"; id = "b"; bridge = "br0"; } ]; };
    error = "type bridge is not supported";
  };
  comma-path = {
    desc = { inherit kernel; volumes = [ { image = "a,b.img"; } ]; };
    error = "contains a comma";
  };
  unknown-attr = { desc = { inherit kernel; vcpus = 2; }; error = "unknown attribute(s) vcpus"; };
  small-mem = { desc = { inherit kernel; mem = 32; }; error = "at least 64"; };
}
