# What nixosModules.vm (build-vm) and nixosModules.test (NixOS test nodes) share: in a NixOS
# configuration that imports nixpkgs' qemu-vm.nix, `system.build.vm` becomes a nixvm runner
# made from qemu-vm.nix's options (vm.nix's header has the table). The options under
# virtualisation.nixvm are options.nix's. The devices are on virtio-pci (virtualisation.nixvm
# .transport, default "pci"), as QEMU gives these machines theirs. virtualisation.nixvm.network
# says which NICs the machine gets:
#   "user"  one user-mode interface through passt, with forwardPorts (build-vm);
#   "test"  a test driver's machine: eth0 on nixvm's local network (--net local: DHCP gives
#           10.0.2.15, the gateway answers ARP and ping; the build sandbox has no network for
#           passt to give), then one NIC per vlan, in the order and with the MACs nixpkgs'
#           test network (nixos/lib/testing/network.nix) gives QEMU's, each on the vde_switch
#           the driver names in $QEMU_VDE_SOCKET_<vlan>; SIGTERM (the driver's clean-up)
#           stops it at once, as it stops QEMU.
{ config, options, lib, pkgs, ... }:
let
  inherit (lib) mkDefault mkForce;
  cfg = config.virtualisation;
  name = config.system.name;
  toplevel = config.system.build.toplevel;
  regInfo = pkgs.closureInfo { rootPaths = cfg.additionalPaths; };
  testMachine = cfg.nixvm.network == "test";

  unsupported = opt: why:
    throw "nixvm (virtualisation.nixvm${if testMachine then ", a NixOS test node" else ", nixos-rebuild build-vm"}) does not support virtualisation.${opt}: ${why}";
  checks = lib.all (x: x) [
    (cfg.graphics -> unsupported "graphics" "nixvm has a serial console, no display (set it to false)")
    (cfg.useBootLoader -> unsupported "useBootLoader" "nixvm boots the kernel directly")
    (cfg.useEFIBoot -> unsupported "useEFIBoot" "nixvm has no firmware")
    (cfg.useNixStoreImage -> unsupported "useNixStoreImage" "the host store is shared through virtio-fs")
    (cfg.tpm.enable -> unsupported "tpm.enable" "nixvm has no TPM")
    ((cfg.bios != null) -> unsupported "bios" "nixvm boots the kernel directly")
    (cfg.restrictNetwork -> unsupported "restrictNetwork" "passt cannot restrict the guest")
    (cfg.useHostCerts -> unsupported "useHostCerts" "not available")
    ((cfg.qemu.diskInterface != "virtio") -> unsupported "qemu.diskInterface" "nixvm's disks are virtio-blk")
    ((!testMachine && cfg.interfaces != { }) -> unsupported "interfaces" "the test driver's VLANs are only there for NixOS test nodes (nixosModules.test); the VM has one user-mode (passt) interface")
    ((testMachine && cfg.forwardPorts != [ ]) -> unsupported "forwardPorts" "a test node's eth0 is nixvm's local network, which forwards nothing; reach the node over a vlan")
  ];

  # The vlan NICs as network.nix numbers them: allInterfaces where qemu-vm.nix has it (by
  # name), else the older eth<N> per vlans entry, then the named interfaces.
  vlanNics =
    if options.virtualisation ? allInterfaces then lib.attrValues cfg.allInterfaces
    else lib.imap1 (i: vlan: { name = "eth${toString i}"; inherit vlan; }) cfg.vlans
      ++ lib.mapAttrsToList (n: i: { name = n; inherit (i) vlan; }) cfg.interfaces;
  # qemu-common.nix's qemuNicMac.
  hex2 = n: lib.optionalString (n < 16) "0" + lib.toLower (lib.toHexString n);
  nicMac = vlan: node: "52:54:00:12:${hex2 vlan}:${hex2 node}";
  interfaces =
    if testMachine then
      [ { type = "local"; id = "user0"; mac = "52:54:00:12:34:56"; } ]
      ++ map (i: {
        type = "vde";
        id = i.name;
        socketEnv = "QEMU_VDE_SOCKET_${toString i.vlan}";
        mac = nicMac i.vlan cfg.test.nodeNumber;
      }) vlanNics
    else [ { type = "user"; id = "user0"; } ];

  # The run directory holds links to what the shell decides at run time (the root image,
  # share sources), so that the argv stays the same.
  shareDirs = lib.filterAttrs (tag: _: tag != "nix-store") cfg.sharedDirectories;
  shares =
    lib.optional (cfg.sharedDirectories ? nix-store) {
      tag = "nix-store";
      source = "/nix/store";
      mountPoint = cfg.sharedDirectories.nix-store.target;
      readOnly = true;
      backend = "nixvm";
    }
    ++ lib.mapAttrsToList (tag: s: {
      inherit tag;
      source = "share-${tag}";
      mountPoint = s.target;
      backend = "virtiofsd";
      socket = "virtiofs-${tag}.sock";
    }) shareDirs;

  volumes =
    lib.optional (cfg.diskImage != null) {
      image = "root.img";
      size = cfg.diskSize;
      label = "nixos";
      serial = "root";
      fsType = "ext4";
    }
    ++ lib.imap0 (i: size: { image = "empty${toString i}.img"; inherit size; fsType = null; })
      cfg.emptyDiskImages;

  preStart = ''
    NIX_DISK_IMAGE=$(readlink -f "''${NIX_DISK_IMAGE:-${toString cfg.diskImage}}") || test -z "$NIX_DISK_IMAGE"
    if [ -z "''${TMPDIR:-}" ] || [ -z "''${USE_TMPDIR:-}" ]; then
      TMPDIR=$(mktemp -d nix-vm.XXXXXXXXXX --tmpdir)
    fi
    mkdir -p "$TMPDIR/xchg"
  '' + lib.optionalString (cfg.diskImage != null) ''
    if [ -f "$NIX_DISK_IMAGE" ] && [ "$(head -c 3 "$NIX_DISK_IMAGE")" = QFI ]; then
      echo "run-${name}-vm: $NIX_DISK_IMAGE is a qcow2 image (QEMU's); nixvm needs a raw one: remove it, or point NIX_DISK_IMAGE elsewhere" >&2
      exit 2
    fi
    ln -sfn "$NIX_DISK_IMAGE" "$TMPDIR/root.img"
  '' + lib.concatStrings (lib.mapAttrsToList (tag: s: ''
    ln -sfn ${s.source} "$TMPDIR/share-${tag}"
  '') shareDirs) + ''
    cd "$TMPDIR"
  '';

  runner = import ../lib/runner.nix {
    inherit name volumes shares preStart interfaces;
    nixvm = "${cfg.nixvm.package}/bin/nixvm";
    vcpu = cfg.cores;
    mem = cfg.memorySize;
    kernel = "${toplevel}/kernel";
    initrd = cfg.directBoot.initrd;
    kernelParams = config.boot.kernelParams ++ [
      "init=${toplevel}/init"
      "regInfo=${regInfo}/registration"
    ];
    cmdlineEnv = "QEMU_KERNEL_PARAMS";
    socket = null;
    inherit (cfg) forwardPorts;
    passt = "${pkgs.passt}/bin/passt";
    virtiofsd = "${pkgs.virtiofsd}/bin/virtiofsd";
    shell = pkgs.runtimeShell;
    path = map (p: "${p}/bin") [ pkgs.coreutils pkgs.e2fsprogs ];
    inherit (cfg.nixvm) extraArgs transport;
    # The driver ends a test by SIGTERM to each machine's start command, where QEMU stops at
    # once: a test machine's power button gets no grace time either.
    shutdownTimeout = if testMachine then 0 else null;
    # QEMU's: a guest that reboots boots again; the test driver's -no-reboot (every start but
    # start(allow_reboot=True)) makes it exit instead.
    onReboot = "restart";
  };
in
{
  # Only where qemu-vm.nix is (a test's containers import this module too, through defaults).
  config = lib.mkIf (options.virtualisation ? qemu) {
    # qemu-vm.nix's defaults that nixvm sees otherwise.
    virtualisation.graphics = mkDefault false;
    virtualisation.diskImage = mkDefault "./${name}.img";

    boot.initrd.kernelModules = [ "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_net" "virtiofs" ]
      ++ lib.optional cfg.writableStore "overlay"
      # The backdoor's /dev/hvc0 and the driver's virtio-rng-pci.
      ++ lib.optionals testMachine [ "virtio_console" "virtio_rng" ];

    # The shares as virtio-fs instead of 9p (qemu-vm.nix makes their fileSystems).
    virtualisation.fileSystems = lib.mapAttrs' (tag: s: lib.nameValuePair s.target {
      fsType = mkForce "virtiofs";
      options = mkForce (lib.optional (tag == "nix-store") "ro");
    }) cfg.sharedDirectories;

    system.build.vm = mkForce (assert checks; pkgs.runCommand "nixvm-${name}-vm" {
      preferLocalBuild = true;
      meta.mainProgram = "run-${name}-vm";
      passthru = {
        inherit (runner) argv cmdline;
        nixvmConfig = runner.config;
        runnerScript = runner.script;
      };
    } ''
      mkdir -p $out/bin
      ln -s ${toplevel} $out/system
      ln -s ${pkgs.writeScript "run-${name}-vm" runner.script} $out/bin/run-${name}-vm
    '');
  };
}
