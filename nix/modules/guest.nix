# nixvm's NixOS guest module: a NixOS system that boots under nixvm, and its runner,
# `system.build.vm` with `bin/run-<hostName>-vm` (the name nixpkgs' qemu-vm.nix gives the QEMU
# one). Options under `nixvm.` carry microvm.nix's names where they mean the same.
#
# The guest: its virtio devices on virtio-pci (nixvm.transport), the NICs named eth0, eth1, …
# (as qemu-vm.nix names them), both transports' drivers in the initrd, no boot loader, a tmpfs
# `/` (by default), the host's /nix/store through virtio-fs at /nix/.ro-store with a writable
# overlay on /nix/store (tmpfs at /nix/.rw-store unless something else is mounted there),
# fileSystems for volumes and shares. Read-only shares, the store among them, are served by
# nixvm itself (backend "nixvm": `--fs tag=…,path=…,readonly=on`), writable ones by
# virtiofsd. The runner: creates
# missing volumes (truncate + mkfs), starts a virtiofsd per share with backend "virtiofsd"
# unless NIXVM_SKIP_VIRTIOFSD=1, runs nixvm booting the system's kernel and initrd with
# `<boot.kernelParams> init=<toplevel>/init regInfo=<closure-info>/registration console=ttyS0
# reboot=k panic=-1`; `bin/shutdown-<hostName>-vm` powers it off (`nixvm ctl … shutdown`).
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkDefault mkIf mkMerge types literalExpression;
  cfg = config.nixvm;
  hostName = config.networking.hostName;
  toplevel = config.system.build.toplevel;
  ov = cfg.writableStoreOverlay;

  storeShare = {
    tag = "ro-store";
    source = "/nix/store";
    mountPoint = "/nix/.ro-store";
    socket = "${hostName}-virtiofs-ro-store.sock";
    proto = "virtiofs";
    readOnly = true;
    backend = cfg.storeBackend;
  };
  shares = lib.optional cfg.mountHostNixStore storeShare ++ cfg.shares;

  # The description nix/lib/runner.nix takes (microvm.nix's names).
  description = {
    name = hostName;
    nixvm = "${cfg.package}/bin/nixvm";
    inherit (cfg) vcpu mem socket kernelParams preStart shutdownTimeout onReboot transport extraArgs serial console;
    kernel = cfg.kernel;
    initrd = cfg.initrd;
    volumes = map (v: removeAttrs v [ "_module" ]) cfg.volumes;
    shares = map (s: removeAttrs s [ "_module" ]) shares;
    interfaces = map (i: removeAttrs i [ "_module" ]) cfg.interfaces;
    forwardPorts = map (f: { inherit (f) from proto; host = { inherit (f.host) address port; }; guest.port = f.guest.port; }) cfg.forwardPorts;
    passt = "${cfg.passt}/bin/passt";
    shell = pkgs.runtimeShell;
    path = map (p: "${p}/bin") ([ pkgs.coreutils pkgs.util-linux ] ++ mkfsPackages);
    virtiofsd = "${cfg.virtiofsd}/bin/virtiofsd";
    inherit (cfg) virtiofsdArgs;
    vsock = { inherit (cfg.vsock) cid socket; };
    credentials = cfg.credentialFiles;
  };
  runner = import ../lib/runner.nix description;

  fsTypes = map (v: v.fsType) (builtins.filter (v: v.autoCreate && v.size != null) cfg.volumes);
  mkfsPackages = lib.unique (map (t: {
    ext2 = pkgs.e2fsprogs; ext3 = pkgs.e2fsprogs; ext4 = pkgs.e2fsprogs;
    xfs = pkgs.xfsprogs; vfat = pkgs.dosfstools; btrfs = pkgs.btrfs-progs;
  }.${t} or (throw "nixvm.volumes: no mkfs known for fsType ${t}")) fsTypes);

  regInfo = pkgs.closureInfo { rootPaths = [ toplevel ]; };

  runScript = pkgs.writeScript "run-${hostName}-vm" runner.script;
  shutdownScript = pkgs.writeScript "shutdown-${hostName}-vm" runner.shutdownScript;

  letters = lib.stringToCharacters "abcdefghijklmnopqrstuvwxyz";

  volumeType = types.submodule {
    options = {
      image = mkOption { type = types.str; description = "Path of the disk image on the host (relative: to the runner's working directory)."; };
      serial = mkOption { type = types.nullOr types.str; default = null; description = "Serial number the guest sees (at most 20 bytes)."; };
      direct = mkOption { type = types.bool; default = false; description = "Open the image with O_DIRECT."; };
      readOnly = mkOption { type = types.bool; default = false; description = "Read-only disk."; };
      label = mkOption { type = types.nullOr types.str; default = null; description = "File system label, given at creation; the guest mounts by label when set."; };
      mountPoint = mkOption { type = types.nullOr types.str; default = null; description = "Where the guest mounts the volume, if at all."; };
      size = mkOption { type = types.nullOr types.int; default = null; description = "Size in MiB of an image the runner creates when it is missing."; };
      autoCreate = mkOption { type = types.bool; default = true; description = "Create a missing image (truncate + mkfs) before starting; needs size."; };
      mkfsExtraArgs = mkOption { type = types.listOf types.str; default = [ ]; description = "More mkfs arguments."; };
      fsType = mkOption { type = types.str; default = "ext4"; description = "File system for creation and mounting."; };
    };
  };

  shareType = types.submodule ({ config, ... }: {
    options = {
      tag = mkOption { type = types.str; description = "virtio-fs tag (at most 36 bytes)."; };
      socket = mkOption {
        type = types.str;
        default = "${hostName}-virtiofs-${config.tag}.sock";
        defaultText = literalExpression ''"''${hostName}-virtiofs-''${tag}.sock"'';
        description = "virtiofsd's vhost-user socket (backend \"virtiofsd\" only).";
      };
      source = mkOption { type = types.str; description = "Directory on the host."; };
      mountPoint = mkOption { type = types.str; description = "Where the guest mounts it."; };
      proto = mkOption { type = types.enum [ "virtiofs" ]; default = "virtiofs"; description = "Only virtio-fs (microvm.nix's 9p is not available)."; };
      readOnly = mkOption { type = types.bool; default = false; description = "Serve the share read-only (and mount it ro in the guest)."; };
      backend = mkOption {
        type = types.enum [ "nixvm" "virtiofsd" ];
        default = if config.readOnly then "nixvm" else "virtiofsd";
        defaultText = literalExpression ''if readOnly then "nixvm" else "virtiofsd"'';
        description = ''
          Who serves the share. "nixvm": nixvm itself, read-only (`--fs tag=…,path=…,readonly=on`;
          it starts its own back-end process, nothing else runs and there is no socket); only
          for readOnly shares. It reads `source` with the permissions of the user nixvm runs as
          (the host module's `nixvm`) and, made for the immutable store, lets the guest cache
          entries, attributes (24 h) and file contents across opens: for a directory whose
          files change in place, or one that user cannot read, use "virtiofsd". "virtiofsd": a
          virtiofsd listening on `socket` (started by the runner, or by the host module's
          unit), with --readonly when readOnly.
        '';
      };
    };
  });

  interfaceType = types.submodule {
    options = {
      type = mkOption { type = types.enum [ "tap" "macvtap" "user" ]; description = "A TAP device by name, a macvtap opened by the runner (/dev/tap<ifindex>), or user-mode networking through a passt nixvm starts (no root or TAP needed; the guest reaches the host's loopback at its gateway address, and `forwardPorts` reach the guest)."; };
      id = mkOption { type = types.str; description = "Interface name on the host."; };
      mac = mkOption { type = types.nullOr types.str; default = null; description = "MAC address of the guest's interface; null: nixvm derives a stable one from id."; };
      macvtap.link = mkOption { type = types.nullOr types.str; default = null; description = "Host interface a macvtap attaches to (used by the host module)."; };
      macvtap.mode = mkOption { type = types.enum [ "private" "vepa" "bridge" "passthru" "source" ]; default = "bridge"; description = "MACVTAP mode (used by the host module)."; };
      bridge = mkOption { type = types.nullOr types.str; default = null; description = "Bridge the host module attaches a TAP to."; };
    };
  };
in
{
  options.nixvm = {
    package = mkOption {
      type = types.package;
      default = pkgs.nixvm or (throw "nixvm.package is not set (use nixvm's flake, or an overlay with pkgs.nixvm)");
      defaultText = literalExpression "pkgs.nixvm";
      description = "The nixvm package the runner uses.";
    };
    virtiofsd = mkOption {
      type = types.package;
      default = pkgs.virtiofsd;
      defaultText = literalExpression "pkgs.virtiofsd";
      description = "The virtiofsd the runner starts, when run by hand, for each share with backend \"virtiofsd\".";
    };
    virtiofsdArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--sandbox" "none" ];
      description = "More arguments for the virtiofsd the runner starts.";
    };
    vcpu = mkOption { type = types.ints.between 1 254; default = 1; description = "Number of vCPUs."; };
    serial = mkOption {
      type = types.str;
      default = "stdio";
      example = "socket=console.sock";
      description = "Where the serial console (ttyS0) goes (--serial): stdio, off, file=PATH, socket=PATH (nixvm listens) or connect=PATH (nixvm connects).";
    };
    console = mkOption {
      type = types.str;
      default = "off";
      example = "socket=hvc0.sock";
      description = ''
        Where a virtio-console (/dev/hvc0 in the guest) goes (--console): stdio, file=PATH,
        socket=PATH or connect=PATH; "off": no such device. It moves a buffer at a time where
        the serial port costs a trap per byte. With `console=hvc0` last in boot.kernelParams
        it is the guest's console (once the virtio_console driver has loaded).
      '';
    };
    mem = mkOption { type = types.ints.positive; default = 512; description = "RAM in MiB (at least 64)."; };
    socket = mkOption {
      type = types.nullOr types.str;
      default = "${hostName}.sock";
      defaultText = literalExpression ''"''${hostName}.sock"'';
      description = "nixvm's control socket (--api-socket), for shutdown; null: none.";
    };
    kernel = mkOption {
      type = types.str;
      default = "${toplevel}/kernel";
      defaultText = literalExpression ''"''${config.system.build.toplevel}/kernel"'';
      description = "The kernel nixvm boots (bzImage, or a PVH vmlinux).";
    };
    initrd = mkOption {
      type = types.nullOr types.str;
      default = "${toplevel}/initrd";
      defaultText = literalExpression ''"''${config.system.build.toplevel}/initrd"'';
      description = "The initrd nixvm loads.";
    };
    kernelParams = mkOption {
      type = types.listOf types.str;
      description = ''
        The kernel command line nixvm passes (console=ttyS0 reboot=k panic=-1 follow). Includes
        boot.kernelParams but does not end up in the toplevel, so it may refer to it.
      '';
    };
    preStart = mkOption { type = types.lines; default = ""; description = "Commands the runner runs before nixvm."; };
    volumes = mkOption { type = types.listOf volumeType; default = [ ]; description = "Disk images: /dev/vda, /dev/vdb, … in order."; };
    shares = mkOption { type = types.listOf shareType; default = [ ]; description = "Directories shared through virtio-fs (besides the store)."; };
    interfaces = mkOption { type = types.listOf interfaceType; default = [ ]; description = "Network interfaces: eth0, eth1, … in order."; };
    forwardPorts = mkOption {
      type = types.listOf (types.submodule {
        options = {
          from = mkOption { type = types.enum [ "host" ]; default = "host"; description = "Only host-to-guest forwarding."; };
          proto = mkOption { type = types.enum [ "tcp" "udp" ]; default = "tcp"; description = "Protocol."; };
          host.address = mkOption { type = types.str; default = ""; description = "Host address to bind (\"\": all)."; };
          host.port = mkOption { type = types.port; description = "Host port."; };
          guest.port = mkOption { type = types.port; description = "Guest port."; };
        };
      });
      default = [ ];
      example = literalExpression ''[ { host.port = 2222; guest.port = 22; } ]'';
      description = "Host ports forwarded to the guest through the first interface of type \"user\" (qemu-vm.nix's virtualisation.forwardPorts).";
    };
    passt = mkOption {
      type = types.package;
      default = pkgs.passt;
      defaultText = literalExpression "pkgs.passt";
      description = "The passt nixvm starts for interfaces of type \"user\".";
    };
    mountHostNixStore = mkOption {
      type = types.bool;
      default = true;
      description = "Share the host's /nix/store (read-only, tag ro-store) and mount it at /nix/.ro-store.";
    };
    storeBackend = mkOption {
      type = types.enum [ "nixvm" "virtiofsd" ];
      default = "nixvm";
      description = ''
        Who serves the host's /nix/store share (see shares.*.backend): nixvm itself, read-only,
        with nothing else to run; or a virtiofsd (--readonly) on the socket
        `<hostName>-virtiofs-ro-store.sock`.
      '';
    };
    writableStoreOverlay = mkOption {
      type = types.nullOr types.str;
      default = "/nix/.rw-store";
      description = ''
        With the host's store shared: the directory holding a writable overlay over it on
        /nix/store (a tmpfs by default: mount a volume there to keep it); null: /nix/store is
        the read-only share.
      '';
    };
    vsock = {
      cid = mkOption {
        type = types.nullOr (types.ints.between 3 4294967294);
        default = null;
        description = ''
          The guest's vsock CID: a virtio-vsock device whose host side is the UNIX socket
          `vsock.socket` (host programs write `CONNECT <port>` to it to reach a guest port; the
          guest's connections to host port P reach `<socket>_P`). Without it the VM still
          gets a vsock device for readiness when nixvm runs as a Type=notify unit.
        '';
      };
      socket = mkOption {
        type = types.str;
        default = "${hostName}-vsock.sock";
        defaultText = literalExpression ''"''${hostName}-vsock.sock"'';
        description = "The vsock device's UNIX socket (relative: to the runner's working directory).";
      };
      ssh.enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          sshd on vsock port 22 (systemd's ssh generator sets it up when sshd is enabled):
          from the host, `ssh vsock-mux/<vsock.socket>` (systemd 257's ssh proxy). Needs
          `vsock.cid`.
        '';
      };
    };
    credentialFiles = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { "tls.key" = "/run/secrets/web-tls-key"; };
      description = ''
        systemd credentials for the guest from files on the host, read when the VM starts
        (never copied into the store): NAME = path. The guest finds them in
        /run/credentials/@system/NAME (SMBIOS OEM strings; together at most ~63 KiB).
      '';
    };
    shutdownTimeout = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Seconds the guest has to power off after the power button (nixvm's default: 30)."; };
    onReboot = mkOption { type = types.enum [ "exit" "restart" ]; default = "restart"; description = "A guest reboot boots the VM again in place (restart), or ends nixvm with status 3 (exit)."; };
    transport = mkOption { type = types.enum [ "mmio" "pci" ]; default = "pci"; description = "How the virtio devices attach (--transport): \"pci\", virtio-pci with MSI-X (nixvm's faster I/O; the bus QEMU gives NixOS VMs), or \"mmio\", virtio-mmio (nixvm's own default). The NICs are eth0, eth1, … on either (networking.usePredictableInterfaceNames defaults to false here, as qemu-vm.nix sets it)."; };
    extraArgs = mkOption { type = types.listOf types.str; default = [ ]; description = "More nixvm arguments."; };
    runner = mkOption {
      type = types.attrsOf types.unspecified;
      readOnly = true;
      internal = true;
      description = "What nix/lib/runner.nix made of this configuration: argv, script, shutdownArgv, cmdline, config.";
    };
  };

  config = mkMerge [
    {
      nixvm.runner = runner;
      nixvm.kernelParams = config.boot.kernelParams ++ [
        "init=${toplevel}/init"
        "regInfo=${regInfo}/registration"
      ];

      assertions = [{
        assertion = cfg.vsock.ssh.enable -> cfg.vsock.cid != null;
        message = "nixvm.vsock.ssh.enable needs nixvm.vsock.cid";
      }];
      services.openssh.enable = mkIf cfg.vsock.ssh.enable true;
      # The vsock transport, for readiness (vmm.notify_socket) and vsock services.
      boot.kernelModules = [ "vmw_vsock_virtio_transport" ];

      boot.loader.grub.enable = false;
      # eth0, eth1, … on either transport, as qemu-vm.nix names a VM's NICs.
      networking.usePredictableInterfaceNames = mkDefault false;
      boot.initrd.kernelModules = [ "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_net" "virtiofs" ]
        ++ lib.optional (cfg.mountHostNixStore && ov != null) "overlay";

      # The store's registration, as qemu-vm.nix does it.
      boot.postBootCommands = ''
        if [[ "$(cat /proc/cmdline)" =~ regInfo=([^ ]*) ]]; then
          ${config.nix.package.out}/bin/nix-store --load-db < ''${BASH_REMATCH[1]}
        fi
      '';

      fileSystems = mkMerge ([
        { "/" = mkDefault { device = "rootfs"; fsType = "tmpfs"; options = [ "size=50%" "mode=0755" ]; neededForBoot = true; }; }
      ]
      ++ lib.imap0 (i: v: lib.optionalAttrs (v.mountPoint != null) {
        ${v.mountPoint} = {
          device = if v.label != null then "/dev/disk/by-label/${v.label}" else "/dev/vd${builtins.elemAt letters i}";
          inherit (v) fsType;
        } // lib.optionalAttrs (v.mountPoint == ov) { neededForBoot = true; };
      }) cfg.volumes
      ++ map (s: {
        ${s.mountPoint} = {
          device = s.tag;
          fsType = "virtiofs";
          options = [ "defaults" ] ++ lib.optional s.readOnly "ro";
        } // lib.optionalAttrs (s.source == "/nix/store" || s.mountPoint == ov) { neededForBoot = true; };
      }) shares
      ++ lib.optional (cfg.mountHostNixStore && ov != null) {
        ${ov} = mkDefault { fsType = "tmpfs"; device = "tmpfs"; options = [ "mode=0755" ]; neededForBoot = true; };
      }
      ++ lib.optional (cfg.mountHostNixStore && ov == null) {
        "/nix/store" = { device = "/nix/.ro-store"; fsType = "none"; options = [ "bind" ]; neededForBoot = true; };
      });

      system.build.vm = pkgs.runCommand "nixvm-${hostName}" {
        preferLocalBuild = true;
        meta.mainProgram = "run-${hostName}-vm";
        passthru = {
          inherit (runner) argv shutdownArgv cmdline;
          inherit hostName;
          runnerName = "run-${hostName}-vm";
          nixvmConfig = runner.config;
        };
      } (''
        mkdir -p $out/bin
        ln -s ${runScript} $out/bin/run-${hostName}-vm
        ln -s ${toplevel} $out/system
      '' + lib.optionalString (runner.shutdownScript != null) ''
        ln -s ${shutdownScript} $out/bin/shutdown-${hostName}-vm
      '');
    }

    # The overlay on /nix/store, made in the initrd (as qemu-vm.nix makes it).
    (mkIf (cfg.mountHostNixStore && ov != null && !config.boot.initrd.systemd.enable) {
      boot.initrd.postMountCommands = ''
        mkdir -p -m 0755 $targetRoot${ov}/store $targetRoot${ov}/work $targetRoot/nix/store
        mount -t overlay overlay $targetRoot/nix/store \
          -o lowerdir=$targetRoot/nix/.ro-store,upperdir=$targetRoot${ov}/store,workdir=$targetRoot${ov}/work || fail
      '';
    })
    (mkIf (cfg.mountHostNixStore && ov != null && config.boot.initrd.systemd.enable) {
      boot.initrd.systemd.mounts = [{
        where = "/sysroot/nix/store";
        what = "overlay";
        type = "overlay";
        options = "lowerdir=/sysroot/nix/.ro-store,upperdir=/sysroot${ov}/store,workdir=/sysroot${ov}/work";
        wantedBy = [ "initrd-fs.target" ];
        before = [ "initrd-fs.target" ];
        requires = [ "nixvm-rw-store.service" ];
        after = [ "nixvm-rw-store.service" ];
        unitConfig.RequiresMountsFor = "/sysroot/nix/.ro-store";
      }];
      boot.initrd.systemd.services.nixvm-rw-store = {
        unitConfig = {
          DefaultDependencies = false;
          RequiresMountsFor = "/sysroot${ov}";
        };
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "/bin/mkdir -p -m 0755 /sysroot${ov}/store /sysroot${ov}/work /sysroot/nix/store";
        };
      };
    })
  ];
}
