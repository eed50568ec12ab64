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
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption mkDefault mkForce types literalExpression;
in
{
  options.virtualisation.nixvm = {
    package = mkOption {
      type = types.package;
      default = pkgs.nixvm or (throw "virtualisation.nixvm.package is not set (use nixvm's flake, or an overlay with pkgs.nixvm)");
      defaultText = literalExpression "pkgs.nixvm";
      description = "The nixvm that runs `nixos-rebuild build-vm`'s VM.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More nixvm arguments for the build-vm runner.";
    };
  };

  config.virtualisation.vmVariant = { config, options, ... }:
    let
      cfg = config.virtualisation;
      name = config.system.name;
      toplevel = config.system.build.toplevel;
      regInfo = pkgs.closureInfo { rootPaths = cfg.additionalPaths; };
      sh = lib.escapeShellArg;

      unsupported = opt: why:
        throw "nixvm (virtualisation.nixvm, nixos-rebuild build-vm) does not support virtualisation.${opt}: ${why}";
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
        ((cfg.interfaces != { }) -> unsupported "interfaces" "the test driver's VLANs are not available; the VM has one user-mode (passt) interface")
      ];

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
        inherit name volumes shares preStart;
        nixvm = "${config.virtualisation.nixvm.package}/bin/nixvm";
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
        interfaces = [ { type = "user"; id = "user0"; } ];
        inherit (cfg) forwardPorts;
        passt = "${pkgs.passt}/bin/passt";
        virtiofsd = "${pkgs.virtiofsd}/bin/virtiofsd";
        shell = pkgs.runtimeShell;
        path = map (p: "${p}/bin") [ pkgs.coreutils pkgs.e2fsprogs ];
        inherit (config.virtualisation.nixvm) extraArgs;
      };
    in
    {
      # qemu-vm.nix's defaults that nixvm sees otherwise.
      virtualisation.graphics = mkDefault false;
      virtualisation.diskImage = mkDefault "./${name}.img";

      boot.initrd.kernelModules = [ "virtio_mmio" "virtio_blk" "virtio_net" "virtiofs" ]
        ++ lib.optional cfg.writableStore "overlay";

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
