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
#                    it is sorted.
# The rest of NixOS is the stand-ins of nix/tests/modules.nix.
{ lib ? null, nixpkgs ? null, names ? false }:
let
  testNames = [ "vm-real-runner" "vm-real-rejects" "vm-real-options" ];
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
      ];
    }
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
    { what = "initrd drivers"; got = lib.all (m: lib.elem m guest.boot.initrd.kernelModules) [ "virtio_mmio" "virtiofs" "overlay" ]; want = true; }
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
in
{ inherit vm-real-runner vm-real-rejects vm-real-options; }
