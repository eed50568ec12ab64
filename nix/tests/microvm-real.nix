# Tests against microvm.nix's real modules (a checkout of microvm-nix/microvm.nix, which CI
# cannot download: resources/nix-tests.sh takes it from MICROVM_NIX and skips without it):
#   microvm-real-guest    nixvm's backend (nix/modules/microvm.nix) beside microvm.nix's own
#                         option declarations (options.nix, store-disk.nix): the runner and
#                         its argv;
#   microvm-real-host     microvm.nix's host module (nixos-modules/host) with a nixvm VM: its
#                         units evaluate, read what they need of the runner;
#   microvm-real-options  every microvm.* option microvm.nix declares is honoured by the
#                         backend, rejected at evaluation, or named here as not the runner's
#                         business: a new option upstream fails this test until it is sorted.
# The rest of NixOS is the stand-ins of nix/tests/modules.nix.
{ lib ? null, microvm ? null, names ? false }:
let
  testNames = [ "microvm-real-guest" "microvm-real-host" "microvm-real-options" ];
in
if names then testNames else
let
  t = (import ./modules.nix { inherit lib; })._internals;
  inherit (t) pkgs drv store expect has nixvmBin toplevel;
  # A file of the checkout (a path: nothing is copied to the store).
  mvm = f: microvm + "/${f}";

  # What microvm.nix's options.nix reads of NixOS beyond the shared stand-ins.
  nixosExtra = { config, ... }: with lib; {
    options.boot.kernelPackages = mkOption { type = types.anything; default = { kernel = drv "linux" { version = "6.6.1"; }; }; };
    options.system.boot.loader.initrdFile = mkOption { type = types.str; default = "initrd"; };
    options.security.virtualisation.flushL1DataCache = mkOption { type = types.nullOr types.str; default = null; };
    options.assertions = mkOption { type = types.listOf types.anything; default = [ ]; };
    options.warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    options.nix.enable = mkOption { type = types.bool; default = true; };
    config.system.build.initialRamdisk = drv "initrd" { };
  };

  guestEval = extra: lib.evalModules {
    modules = [
      t.nixosStandIns
      nixosExtra
      { _module.args.pkgs = pkgs; }
      (mvm "nixos-modules/microvm/options.nix")
      (mvm "nixos-modules/microvm/store-disk.nix")
      ../modules/microvm.nix
      {
        networking.hostName = "real";
        microvm = {
          hypervisor = "nixvm";
          vcpu = 2;
          mem = 768;
          socket = "real.sock";
          volumes = [ { image = "var.img"; mountPoint = "/var"; size = 64; } ];
          shares = [ { tag = "ro-store"; source = "/nix/store"; mountPoint = "/nix/.ro-store"; proto = "virtiofs"; } ];
          interfaces = [ { type = "tap"; id = "vm-real"; mac = "02:00:00:00:00:09"; } ];
        };
      }
      extra
    ];
  };
  guest = guestEval { };
  runner = guest.config.microvm.declaredRunner;

  microvm-real-guest = expect [
    { what = "declaredRunner is nixvm's"; got = runner.hypervisor; want = "nixvm"; }
    {
      what = "argv from microvm.nix's own option defaults";
      got = runner.nixvmArgv;
      want = [
        nixvmBin "--kernel" "${store "linux"}/bzImage" "--initrd" "${store "initrd"}/initrd"
        # (microvm.nix's registerClosure default adds regInfo=)
        "--cmdline" "regInfo=${store "closure-info"}/registration console=ttyS0 reboot=k panic=-1"
        "--cpus" "2" "--memory" "768M"
        "--disk" "path=var.img"
        "--net" "tap=vm-real,mac=02:00:00:00:00:09"
        "--fs" "tag=ro-store,path=/nix/store,readonly=on"
        "--api-socket" "real.sock"
        # A share: virtio-pci, the bus microvm.nix's QEMU runner gives it.
        "--transport" "pci"
      ];
    }
    (has "volume created with its own PATH" runner.scripts.microvm-run "PATH='${store "coreutils"}/bin:")
    (has "volume created" runner.scripts.microvm-run "truncate -s '64M' 'var.img'")
    # microvm.nix's default machineId: a UUID derived from the host name.
    { what = "machined"; got = { inherit (runner) registerWithMachined machineId; }; want = { registerWithMachined = false; machineId = guest.config.microvm.machineId; }; }
    { what = "a machine id"; got = builtins.stringLength runner.machineId; want = 36; }
    { what = "systemd initrd"; got = guest.config.boot.initrd.systemd.enable; want = true; }
  ];

  # microvm.nix's host module, with the NixOS option trees it defines as attribute sets of
  # anything (lists defined more than once would conflict, and none is).
  host = lib.evalModules {
    modules = [
      {
        options = lib.genAttrs [ "assertions" "warnings" "boot" "systemd" "users" "environment" "security" "networking" "services" "nix" "programs" "hardware" "virtualisation" "system" ]
          (_: lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; });
        config._module.args.pkgs = pkgs // {
          callPackage = f: args: drv "microvm-command" { };
          system = "x86_64-linux";
        };
      }
      (mvm "nixos-modules/host")
      { microvm.host.enable = true; microvm.vms.real.evaluatedConfig = guest; }
    ];
  };
  units = host.config.systemd.services;
  microvm-real-host = expect [
    { what = "microvm@real Type (nixvm relays the guest's READY=1)"; got = units."microvm@real".serviceConfig.Type; want = "notify"; }
    { what = "microvm@real not tied to machined"; got = units."microvm@real".wants; want = [ ]; }
    (has "install-microvm-real links the runner" units."install-microvm-real".script "ln -sTf ${runner} current")
  ];

  # Every microvm.* option: what the nixvm backend does with it.
  sorted = {
    # Read by the backend (nix/microvm-runner.nix, nix/modules/microvm.nix).
    honoured = [
      "hypervisor" "runner" "declaredRunner" "vcpu" "mem" "kernel" "initrdPath" "kernelParams"
      "socket" "preStart" "volumes" "shares" "interfaces" "binScripts" "prettyProcnames"
      "storeOnDisk" "storeDisk" "extraArgsScript" "registerWithMachined" "machineId"
      "systemSymlink" "guest.enable" "optimize.enable" "forwardPorts" "vsock.cid"
      "credentialFiles"
    ];
    # Rejected at evaluation when set (microvm-unsupported, and below).
    rejected = [
      "user" "cpu" "balloon" "hotplugMem" "hugepageMem" "graphics.enable" "devices"
    ];
    # Not the runner's: used by microvm.nix's guest or host modules themselves (mounts, store
    # disk building, virtiofsd units, deployment), or meaningful only with a feature that is
    # rejected above.
    notTheRunners = [
      "storeDiskType" "storeDiskErofsFlags" "storeDiskSquashfsFlags" "writableStoreOverlay"
      "bootDisk" "registerClosure" "vmHostPackages" "deploy.installOnHost" "deploy.rebuild"
      "deploy.sshSwitch" "vsock.ssh.enable" "virtiofsd.extraArgs" "virtiofsd.group"
      "virtiofsd.inodeFileHandles" "virtiofsd.package" "virtiofsd.threadPoolSize"
      "hotpluggedMem" "initialBalloonMem" "deflateOnOOM" "balloonMem"
      "graphics.backend" "graphics.crosvmPackage" "graphics.hostmem" "graphics.socket" "graphics.vulkan"
    ];
    # Another hypervisor's settings.
    otherHypervisors = [ "qemu" "cloud-hypervisor" "crosvm" "firecracker" "kvmtool" "stratovirt" "alioth" "vfkit" ];
  };
  optionNames = map (o: lib.concatStringsSep "." (lib.drop 1 o.loc))
    (lib.collect lib.isOption (lib.evalModules {
      modules = map (f: mvm "nixos-modules/microvm/${f}")
        [ "options.nix" "store-disk.nix" "boot-disk.nix" "vsock-ssh.nix" "ssh-deploy.nix" ]
        ++ [ { _module.args.pkgs = pkgs; _module.check = false; } ];
    }).options.microvm);
  known = n: builtins.elem n (sorted.honoured ++ sorted.rejected ++ sorted.notTheRunners)
    || builtins.elem (lib.head (lib.splitString "." n)) sorted.otherHypervisors;
  unsorted = lib.filter (n: !known n) optionNames;
  fails = cfg: !(builtins.tryEval (builtins.deepSeq (guestEval cfg).config.microvm.declaredRunner.nixvmArgv true)).success;
  # microvm.nix's own QEMU runner (lib/runners/qemu.nix, its default hypervisor) on the same
  # configuration, for the bus it puts the devices on (virtio-*-pci or virtio-*-device).
  qemuPkgs = pkgs // {
    inherit lib;
    stdenv.hostPlatform = { system = "x86_64-linux"; isLinux = true; isx86_64 = true; isAarch64 = false; };
  };
  qemuPackage = drv "qemu" { override = _: qemuPackage; overrideAttrs = _: qemuPackage; };
  qemuCommand = extra: let
    c = (guestEval extra).config.microvm;
    mlib = import (mvm "lib") { inherit lib; };
  in (import (mvm "lib/runners/qemu.nix") {
    pkgs = qemuPkgs;
    microvmConfig = c // { hostName = "real"; hypervisor = "qemu"; vmHostPackages = qemuPkgs; qemu = c.qemu // { package = qemuPackage; }; kernel = c.kernel // { out = c.kernel; }; };
    macvtapFds = { };
    inherit (mlib) withDriveLetters extractOptValues extractParamValue;
    linuxTarget = "bzImage";
  }).command;
  microvm-real-options = expect [
    { what = "microvm.* options nobody sorted"; got = unsorted; want = [ ]; }
    # QEMU's user networking becomes passt: the "user" interface and its forwarded ports.
    { what = "user interface and forwardPorts through passt";
      got = lib.filter (lib.hasPrefix "passt=") (guestEval {
        microvm.interfaces = [ { type = "user"; id = "u0"; mac = "02:00:00:00:00:01"; } ];
        microvm.forwardPorts = [ { from = "host"; host.port = 2222; guest.port = 22; } ];
      }).config.microvm.declaredRunner.nixvmArgv;
      want = [ "passt=${store "passt"}/bin/passt,forward=2222:22,mac=02:00:00:00:00:01" ]; }
    { what = "forwardPorts without a user interface rejected"; got = fails { microvm.forwardPorts = [ { from = "host"; host.port = 2222; guest.port = 22; } ]; }; want = true; }
    { what = "guest-to-host forwardPorts rejected"; got = fails {
        microvm.interfaces = [ { type = "user"; id = "u0"; mac = "02:00:00:00:00:01"; } ];
        microvm.forwardPorts = [ { from = "guest"; host.port = 80; guest.port = 80; guest.address = "10.0.2.100"; } ];
      }; want = true; }
    { what = "credentialFiles and vsock.cid passed on, the notify socket supported";
      got = let r = (guestEval { microvm.credentialFiles.x = "/run/secrets/x"; microvm.vsock.cid = 7; }).config.microvm.declaredRunner;
        in { args = lib.filter (x: lib.hasPrefix "x=" x || lib.hasPrefix "cid=" x) r.nixvmArgv; inherit (r) supportsNotifySocket; };
      want = { args = [ "cid=7,socket=notify.vsock" "x=@/run/secrets/x" ]; supportsNotifySocket = true; }; }
    { what = "qcow2 rejected"; got = fails { microvm.volumes = lib.mkForce [ { image = "v.qcow2"; imageType = "qcow2"; mountPoint = "/v"; size = 8; } ]; }; want = true; }
    { what = "registerWithMachined rejected"; got = fails { microvm.registerWithMachined = true; }; want = true; }
    { what = "cpu rejected"; got = fails { microvm.cpu = "host"; }; want = true; }
    { what = "devices rejected"; got = fails { microvm.devices = [ { bus = "pci"; path = "0000:01:00.0"; } ]; }; want = true; }
    { what = "nixvm's bus is the one microvm.nix's QEMU runner picks: virtio-pci with a share, virtio-mmio without";
      got = map (extra: {
        qemu = if lib.hasInfix "virtio-blk-pci" (qemuCommand extra) then "pci"
          else if lib.hasInfix "virtio-blk-device" (qemuCommand extra) then "mmio" else "?";
        nixvm = if lib.elem "pci" (guestEval extra).config.microvm.declaredRunner.nixvmArgv then "pci" else "mmio";
      }) [ { } { microvm.shares = lib.mkForce [ ]; microvm.storeOnDisk = false; } ];
      want = [ { qemu = "pci"; nixvm = "pci"; } { qemu = "mmio"; nixvm = "mmio"; } ]; }
  ];
in
{ inherit microvm-real-guest microvm-real-host microvm-real-options; }
