# Tests of nixosModules.vm (nix/modules/vm.nix, `nixos-rebuild build-vm` on nixvm) inside
# nixpkgs' real build-vm.nix and qemu-vm.nix (with qemu-vm.nix's own imports:
# disk-size-option.nix, profiles/qemu-guest.nix, lib/qemu-common.nix), from a directory that
# holds them at their nixpkgs paths (nixos/...): resources/nix-tests.sh takes it from NIXPKGS
# and skips without it (CI cannot download nixpkgs).
#   vm-real-runner   a configuration's vmVariant: system.build.vm is nixvm's runner, with
#                    memorySize, cores, diskImage/diskSize, emptyDiskImages,
#                    sharedDirectories, forwardPorts and QEMU_KERNEL_PARAMS in it; the guest's
#                    fileSystems are qemu-vm.nix's, with virtio-fs for its 9p shares;
#   vm-real-rejects  options nixvm cannot honour fail evaluation, naming the option;
#   vm-real-options  every virtualisation.* option qemu-vm.nix declares is honoured, rejected,
#                    or named here as QEMU's own: a new option upstream fails this test until
#                    it is sorted;
#   vm-real-test-nodes  nixosModules.test on NixOS test nodes made as nixos/lib/testing/nodes.nix
#                    makes them (qemu-vm.nix, then the test network's modules from the real
#                    nixos/lib/testing/network.nix): each node's system.build.vm is a nixvm
#                    runner whose NICs are the ones the real network module gives QEMU (eth0,
#                    then per vlan the same MACs in the same order, on $QEMU_VDE_SOCKET_<vlan>),
#                    with the backdoor's drivers; lib.getExe of it is run-<name>-vm, the
#                    driver's start_script; named interfaces too; forwardPorts rejected;
#                    a container (no qemu-vm.nix) left alone.
# The newest stored network.nix expects a qemu-vm.nix with virtualisation.allInterfaces,
# newer than the stored one: a stand-in declares it as network.nix uses it.
# The rest of NixOS is the stand-ins of nix/tests/modules.nix.
{ lib ? null, nixpkgs ? null, names ? false }:
let
  testNames = [ "vm-real-runner" "vm-real-rejects" "vm-real-options" "vm-real-test-nodes" ];
in
if names then testNames else
let
  t = (import ./modules.nix { inherit lib; })._internals;
  inherit (t) pkgs drv store expect has toplevel;
  np = f: nixpkgs + "/${f}";

  # What qemu-vm.nix reads of NixOS beyond the shared stand-ins.
  nixosExtra = { config, ... }: with lib; {
    options.system.name = mkOption { type = types.str; default = config.networking.hostName; };
    options.system.boot.loader.initrdFile = mkOption { type = types.str; default = "initrd"; };
    options.services.xserver.resolutions = mkOption { type = types.listOf (types.attrsOf types.int); default = [ ]; };
    options.nixpkgs.pkgs = mkOption { type = types.unspecified; default = pkgs; };
    options.boot.tmp.useTmpfs = mkOption { type = types.bool; default = false; };
    options.boot.tmp.tmpfsSize = mkOption { type = types.str; default = "50%"; };
    options.boot.loader.efi.efiSysMountPoint = mkOption { type = types.str; default = "/boot"; };
    options.nix.enable = mkOption { type = types.bool; default = true; };
    config.system.build.initialRamdisk = drv "initrd" { };
    # QEMU's options and NixOS's other modules are not all here: definitions of undeclared
    # options (services.qemuGuest, boot.loader.limine, …) are let through.
    config._module.check = false;
  };

  hostEval = vmVariant: lib.evalModules {
    modules = [
      t.nixosStandIns
      nixosExtra
      { _module.args.pkgs = pkgs; }
      (np "nixos/modules/virtualisation/build-vm.nix")
      ../modules/vm.nix
      {
        networking.hostName = "web";
        boot.kernelParams = [ "loglevel=4" ];
        virtualisation.nixvm.package = drv "nixvm" { };
        virtualisation.vmVariant = vmVariant;
      }
    ];
  };
  full = hostEval {
    virtualisation = {
      memorySize = 2048;
      cores = 4;
      diskSize = 4096;
      emptyDiskImages = [ 100 ];
      sharedDirectories.data = { source = "/srv/data"; target = "/mnt/data"; };
      forwardPorts = [ { from = "host"; host.port = 2222; guest.port = 22; } ];
    };
  }; 
  vm = full.config.system.build.vm;
  guest = full.config.virtualisation.vmVariant;
  nixvmBin = "${store "nixvm"}/bin/nixvm";
  fs = p: guest.fileSystems.${p};
  pick = p: a: lib.getAttrs a (fs p);

  vm-real-runner = expect [
    {
      what = "argv";
      got = vm.argv;
      want = [
        nixvmBin
        "--kernel" "${toplevel "web"}/kernel"
        "--initrd" "${store "initrd"}/initrd"
        "--cmdline" "loglevel=4 init=${toplevel "web"}/init regInfo=${store "closure-info"}/registration console=ttyS0 reboot=k panic=-1"
        "--cpus" "4" "--memory" "2048M"
        "--disk" "path=root.img,serial=root"
        "--disk" "path=empty0.img"
        "--net" "passt=${store "passt"}/bin/passt,forward=2222:22"
        "--fs" "tag=nix-store,path=/nix/store,readonly=on"
        "--fs" "tag=data,socket=virtiofs-data.sock"
        "--fs" "tag=shared,socket=virtiofs-shared.sock"
        "--fs" "tag=xchg,socket=virtiofs-xchg.sock"
        # QEMU reboots a guest that reboots.
        "--on-reboot" "restart"
        # QEMU's bus for these machines: virtio-pci.
        "--transport" "pci"
      ];
    }
    { what = "transport = \"mmio\""; got = lib.filter (a: a == "mmio") (hostEval { virtualisation.nixvm.transport = "mmio"; }).config.system.build.vm.argv; want = [ "mmio" ]; }
    { what = "NICs named eth0, … by qemu-vm.nix, on PCI too"; got = guest.networking.usePredictableInterfaceNames; want = false; }
    (has "bin/run-web-vm" vm.buildCommand "$out/bin/run-web-vm")
    (has "QEMU_KERNEL_PARAMS" vm.runnerScript "\${QEMU_KERNEL_PARAMS:+ $QEMU_KERNEL_PARAMS}")
    (has "NIX_DISK_IMAGE, default ./web.img" vm.runnerScript "\${NIX_DISK_IMAGE:-./web.img}")
    (has "root image created" vm.runnerScript "truncate -s '4096M' 'root.img'")
    (has "root file system labelled nixos" vm.runnerScript "'mkfs.ext4' '-L' 'nixos' 'root.img'")
    (has "empty disk without a file system" vm.runnerScript "truncate -s '100M' 'empty0.img'")
    (has "a qcow2 image refused" vm.runnerScript "is a qcow2 image (QEMU's)")
    (has "xchg in TMPDIR" vm.runnerScript "ln -sfn \"$TMPDIR\"/xchg \"$TMPDIR/share-xchg\"")
    (has "SHARED_DIR" vm.runnerScript "ln -sfn \"\${SHARED_DIR:-$TMPDIR/xchg}\" \"$TMPDIR/share-shared\"")
    (has "a virtiofsd per writable share" vm.runnerScript "'--socket-path=virtiofs-data.sock' '--shared-dir=share-data'")
    { what = "/nix/.ro-store"; got = pick "/nix/.ro-store" [ "device" "fsType" "options" "neededForBoot" ];
      want = { device = "nix-store"; fsType = "virtiofs"; options = [ "ro" ]; neededForBoot = true; }; }
    { what = "/mnt/data"; got = pick "/mnt/data" [ "device" "fsType" "options" ]; want = { device = "data"; fsType = "virtiofs"; options = [ ]; }; }
    { what = "/"; got = pick "/" [ "device" "fsType" ]; want = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; }; }
    { what = "writable store overlay (qemu-vm.nix's)"; got = (fs "/nix/store").overlay.lowerdir; want = [ "/nix/.ro-store" ]; }
    { what = "initrd drivers"; got = lib.all (m: lib.elem m guest.boot.initrd.kernelModules) [ "virtio_pci" "virtio_mmio" "virtiofs" "overlay" ]; want = true; }
    { what = "no graphics by default"; got = guest.virtualisation.graphics; want = false; }
    # Without a disk image: a tmpfs root, no disk.
    { what = "diskImage = null"; got = lib.filter (a: lib.hasPrefix "path=root" a) (hostEval { virtualisation.diskImage = null; }).config.system.build.vm.argv; want = [ ]; }
  ];

  fails = vmVariant: !(builtins.tryEval (builtins.deepSeq (hostEval vmVariant).config.system.build.vm.argv true)).success;
  rejected = [ "graphics" "useBootLoader" "useEFIBoot" "useNixStoreImage" "tpm.enable" "restrictNetwork" "useHostCerts" ];
  vm-real-rejects = expect (map (o: { what = "${o} rejected"; got = fails (lib.setAttrByPath ([ "virtualisation" ] ++ lib.splitString "." o) true); want = true; }) rejected ++ [
    { what = "bios rejected"; got = fails { virtualisation.bios = drv "qboot" { }; }; want = true; }
    { what = "scsi rejected"; got = fails { virtualisation.qemu.diskInterface = "scsi"; }; want = true; }
    { what = "interfaces rejected"; got = fails { virtualisation.interfaces.eth1.vlan = 1; }; want = true; }
    { what = "guest-to-host forwarding rejected"; got = fails { virtualisation.forwardPorts = [ { from = "guest"; guest.address = "10.0.2.10"; guest.port = 80; host.port = 80; } ]; }; want = true; }
    { what = "the full configuration is accepted"; got = fails { }; want = false; }
  ]);

  # Every virtualisation.* option of qemu-vm.nix (and its imports).
  sorted = {
    honoured = [
      "memorySize" "cores" "diskImage" "diskSize" "emptyDiskImages" "sharedDirectories"
      "writableStore" "writableStoreUseTmpfs" "mountHostNixStore" "forwardPorts"
      "directBoot.initrd" "additionalPaths" "fileSystems" "rootDevice" "useDefaultFilesystems"
    ] ++ rejected ++ [ "bios" "qemu.diskInterface" "interfaces" ];
    # QEMU's own, or meaningful only with a rejected feature: nothing for nixvm to do.
    qemuOnly = [
      "msize" "resolution" "vlans" "qemu.package" "qemu.options" "qemu.consoles"
      "qemu.networkingOptions" "qemu.drives" "qemu.guestAgent.enable" "qemu.virtioKeyboard"
      "host.pkgs" "directBoot.enable" "installBootLoader" "useBIOSBoot" "bootLoaderDevice"
      "bootPartition" "efi.OVMF" "efi.firmware" "efi.variables" "efi.keepVariables"
      "tpm.package" "tpm.deviceModel" "tpm.provisioning" "useSecureBoot" "diskSizeAutoSupported"
      # mkRenamedOptionModule / mkRemovedOptionModule
      "pathsInNixDB" "bootDevice" "efiVars" "persistBootDevice"
    ];
  };
  optionNames = map (o: lib.concatStringsSep "." (lib.drop 1 o.loc))
    (lib.collect lib.isOption (lib.evalModules {
      modules = [ t.nixosStandIns nixosExtra { _module.args.pkgs = pkgs; } (np "nixos/modules/virtualisation/qemu-vm.nix") ];
    }).options.virtualisation);
  unsorted = lib.filter (n: !(lib.elem n (sorted.honoured ++ sorted.qemuOnly))) optionNames;
  vm-real-options = expect [
    { what = "virtualisation.* options nobody sorted"; got = unsorted; want = [ ]; }
  ];

  # The test framework's part: network.nix's modules, for a test with nodes alice and bob.
  testEval = lib.evalModules {
    modules = [
      {
        options.extraBaseModules = lib.mkOption { type = lib.types.deferredModule; default = { }; };
        options.extraBaseNodeModules = lib.mkOption { type = lib.types.deferredModule; default = { }; };
        config._module.args.allMachines = { alice = { }; bob = { }; };
      }
      (np "nixos/lib/testing/network.nix")
    ];
  };
  # Stand-in: newer qemu-vm.nix's virtualisation.allInterfaces (eth<N> per vlans entry, with
  # an address, then the named interfaces).
  allInterfaces = { config, ... }: with lib; {
    options.virtualisation.allInterfaces = mkOption {
      type = types.attrsOf (types.submodule {
        options.name = mkOption { type = types.str; };
        options.vlan = mkOption { type = types.ints.unsigned; };
        options.assignIP = mkOption { type = types.bool; default = false; };
      });
      default = listToAttrs (imap1 (i: vlan: nameValuePair "eth${toString i}" { name = "eth${toString i}"; inherit vlan; assignIP = true; }) config.virtualisation.vlans)
        // mapAttrs (n: i: { name = n; inherit (i) vlan assignIP; }) config.virtualisation.interfaces;
    };
  };
  # What qemu.options (which network.nix adds to) reads of pkgs beyond the stand-ins.
  nodePkgs = pkgs // {
    inherit lib;
    stdenv.hostPlatform = { system = "x86_64-linux"; isx86 = true; isAarch = false; isLinux = true; };
    OVMF.override = _: { fd = drv "OVMF-fd" { systemManagementModeRequired = false; }; };
  };
  nodeEval = name: extra: lib.evalModules {
    modules = [
      t.nixosStandIns
      nixosExtra
      { _module.args = { pkgs = nodePkgs; inherit name; }; }
      (np "nixos/modules/virtualisation/qemu-vm.nix")
      allInterfaces
      # Where network.nix's udev rules go (NixOS's initrd module declares it).
      { options.boot.initrd.services.udev.rules = lib.mkOption { type = lib.types.lines; default = ""; }; }
      testEval.config.extraBaseModules
      testEval.config.extraBaseNodeModules
      ../modules/test.nix
      { virtualisation.nixvm.package = drv "nixvm" { }; }
      extra
    ];
  };
  alice = (nodeEval "alice" { virtualisation.vlans = [ 1 2 ]; }).config;
  bob = (nodeEval "bob" { virtualisation.vlans = [ 1 ]; virtualisation.interfaces.enp7s0.vlan = 3; }).config;
  # The values of `--net`, and the MACs of QEMU's -device flags from the real network module.
  nets = c: map (i: lib.elemAt c.system.build.vm.argv (i + 1))
    (lib.filter (i: lib.elemAt c.system.build.vm.argv i == "--net") (lib.range 0 (lib.length c.system.build.vm.argv - 1)));
  macOf = s: let m = builtins.match ".*mac=([0-9a-f:]+).*" s; in if m == null then null else lib.head m;
  qemuMacs = c: map macOf (lib.filter (lib.hasPrefix "-device virtio-net-pci") c.virtualisation.qemu.options);
  vde = vlan: mac: "vde=\"\${QEMU_VDE_SOCKET_${toString vlan}:?run-${"alice"}-vm: QEMU_VDE_SOCKET_${toString vlan} (the vde_switch of interface eth${toString vlan}) is not set}\",mac=${mac}";
  # Older nixpkgs (the stored qemu-vm.nix's time): no allInterfaces; eth<N> per vlans entry,
  # then the named interfaces.
  older = (lib.evalModules {
    modules = [
      t.nixosStandIns nixosExtra { _module.args.pkgs = nodePkgs; }
      (np "nixos/modules/virtualisation/qemu-vm.nix")
      { options.virtualisation.test.nodeNumber = lib.mkOption { type = lib.types.int; }; }
      ../modules/test.nix
      { virtualisation.nixvm.package = drv "nixvm" { }; virtualisation.test.nodeNumber = 3;
        virtualisation.vlans = [ 2 ]; virtualisation.interfaces.enp7s0.vlan = 5; }
    ];
  }).config;
  container = lib.evalModules {
    modules = [ t.nixosStandIns nixosExtra { _module.args.pkgs = pkgs; } ../modules/test.nix ];
  };
  vm-real-test-nodes = expect [
    { what = "alice's NICs"; got = nets alice; want = [ "local,mac=52:54:00:12:34:56" (vde 1 "52:54:00:12:01:01") (vde 2 "52:54:00:12:02:01") ]; }
    { what = "alice's vlan MACs are QEMU's"; got = map macOf (lib.tail (nets alice)); want = qemuMacs alice; }
    { what = "bob's vlan MACs are QEMU's"; got = map macOf (lib.tail (nets bob)); want = qemuMacs bob; }
    # allInterfaces is by name: enp7s0 comes before eth1, in QEMU's order and in nixvm's.
    { what = "bob: node 2, the named interface on vlan 3 and vlan 1"; got = qemuMacs bob; want = [ "52:54:00:12:03:02" "52:54:00:12:01:02" ]; }
    { what = "udev names alice's eth1 by its MAC"; got = lib.hasInfix ''ATTR{address}=="52:54:00:12:01:01",NAME="eth1"'' alice.boot.initrd.services.udev.rules; want = true; }
    { what = "the driver's start_script"; got = lib.getExe alice.system.build.vm; want = "${alice.system.build.vm}/bin/run-alice-vm"; }
    { what = "the driver's SIGTERM stops a test node at once, a reboot boots again (-no-reboot: exits)";
      got = lib.filter (p: lib.elem p [ "--shutdown-timeout=0" "--on-reboot=restart" "--transport=pci" ])
        (lib.zipListsWith (a: b: "${a}=${b}") alice.system.build.vm.argv (lib.tail alice.system.build.vm.argv));
      want = [ "--shutdown-timeout=0" "--on-reboot=restart" "--transport=pci" ]; }
    { what = "alice's NICs are eth0, eth1, … (test-instrumentation.nix and qemu-vm.nix)"; got = alice.networking.usePredictableInterfaceNames; want = false; }
    { what = "the backdoor's drivers"; got = lib.all (m: lib.elem m alice.boot.initrd.kernelModules) [ "virtio_pci" "virtio_mmio" "virtio_console" "virtio_rng" "virtiofs" ]; want = true; }
    { what = "the store, xchg and shared dir"; got = lib.filter (a: lib.hasPrefix "tag=" a) alice.system.build.vm.argv;
      want = [ "tag=nix-store,path=/nix/store,readonly=on" "tag=shared,socket=virtiofs-shared.sock" "tag=xchg,socket=virtiofs-xchg.sock" ]; }
    (has "the driver's QEMU options go after --" alice.system.build.vm.runnerScript "set -- -- \"$@\" \${QEMU_OPTS-}")
    { what = "forwardPorts rejected on a test node"; got = !(builtins.tryEval (builtins.deepSeq (nodeEval "alice" { virtualisation.forwardPorts = [ { from = "host"; host.port = 8080; guest.port = 80; } ]; }).config.system.build.vm.argv true)).success; want = true; }
    { what = "a container is left alone"; got = container.config.system.build ? vm; want = false; }
    { what = "older nixpkgs: vlans, then interfaces"; got = map macOf (lib.tail (nets older)); want = [ "52:54:00:12:02:03" "52:54:00:12:05:03" ]; }
  ];
in
{ inherit vm-real-runner vm-real-rejects vm-real-options vm-real-test-nodes; }
