# Module tests: nixvm's guest, host and microvm.nix modules under lib.evalModules of the real
# nixpkgs lib, beside the smallest stand-ins for the NixOS (and microvm.nix) options they read
# and a fake pkgs whose derivations are plain attribute sets. resources/nix-tests.sh runs each
# test: `(import ./modules.nix { lib = import <nixpkgs.lib>/lib; }).NAME` is true, or a
# string saying what differs. `{ names = true; }` lists the tests.
{ lib ? null, names ? false }:
let
  testNames = [ "guest" "guest-volumes" "host" "microvm" "microvm-unsupported" "flake" ];
in
if names then testNames else
let
  hash = "00000000000000000000000000000000";
  drv = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${hash}-${name}";
  } // extra;
  store = name: "/nix/store/${hash}-${name}";

  pkgs = {
    runtimeShell = "${store "bash"}/bin/bash";
    stdenv.hostPlatform.system = "x86_64-linux";
    coreutils = drv "coreutils" { };
    util-linux = drv "util-linux" { };
    e2fsprogs = drv "e2fsprogs" { };
    xfsprogs = drv "xfsprogs" { };
    dosfstools = drv "dosfstools" { };
    btrfs-progs = drv "btrfs-progs" { };
    iproute2 = drv "iproute2" { };
    virtiofsd = drv "virtiofsd" { };
    passt = drv "passt" { };
    nixvm = drv "nixvm" { };
    closureInfo = { rootPaths }: drv "closure-info" { inherit rootPaths; };
    writeScript = name: text: drv name { inherit text; };
    writeShellScript = name: text: drv name { inherit text; };
    runCommand = name: attrs: buildCommand:
      drv name ((attrs.passthru or { }) // { inherit buildCommand; meta = attrs.meta or { }; });
    # The host module evaluates `nixvm.vms.<name>.config` with pkgs.nixos.
    nixos = m: evalGuest [ m ];
  };

  # Stand-ins for the NixOS options the modules read or set.
  nixosStandIns = { config, ... }: with lib; {
    options = {
      networking.hostName = mkOption { type = types.str; default = "nixos"; };
      # NixOS's default (network-interfaces.nix).
      networking.usePredictableInterfaceNames = mkOption { type = types.bool; default = true; };
      assertions = mkOption { type = types.listOf types.anything; default = [ ]; };
      services.openssh.enable = mkOption { type = types.bool; default = false; };
      boot.kernelParams = mkOption { type = types.listOf types.str; default = [ ]; };
      boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      boot.initrd.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      boot.initrd.availableKernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      boot.initrd.postMountCommands = mkOption { type = types.lines; default = ""; };
      boot.initrd.systemd.enable = mkOption { type = types.bool; default = false; };
      boot.initrd.systemd.mounts = mkOption { type = types.listOf types.anything; default = [ ]; };
      boot.initrd.systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
      boot.loader.grub.enable = mkOption { type = types.bool; default = true; };
      boot.postBootCommands = mkOption { type = types.lines; default = ""; };
      fileSystems = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options.device = mkOption { type = types.nullOr types.str; default = null; };
          options.fsType = mkOption { type = types.str; default = "auto"; };
          options.options = mkOption { type = types.listOf types.str; default = [ ]; };
          options.neededForBoot = mkOption { type = types.bool; default = false; };
          options.overlay = mkOption { type = types.nullOr types.anything; default = null; };
        });
      };
      nix.package = mkOption { type = types.package; default = drv "nix" { out = drv "nix" { }; }; };
      system.build = mkOption { type = types.lazyAttrsOf types.unspecified; default = { }; };
      users.users = mkOption { type = types.attrsOf types.anything; default = { }; };
      users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
    };
    config.system.build.toplevel = drv "nixos-system-${config.networking.hostName}" { };
  };

  eval = modules: lib.evalModules {
    modules = [ nixosStandIns { _module.args.pkgs = pkgs; } ] ++ modules;
  };
  evalGuest = modules: eval ([ ../modules/guest.nix ] ++ modules);

  # true, or what differs.
  expect = checks:
    let bad = lib.filter (c: c.got != c.want) checks; in
    if bad == [ ] then true
    else lib.concatMapStringsSep "\n" (c: "${c.what}:\n  got  ${builtins.toJSON c.got}\n  want ${builtins.toJSON c.want}") bad;
  has = what: haystack: needle: { inherit what; got = lib.hasInfix needle haystack; want = true; };

  toplevel = name: store "nixos-system-${name}";
  regInfo = "${store "closure-info"}/registration";
  nixvmBin = "${store "nixvm"}/bin/nixvm";
  tail = "console=ttyS0 reboot=k panic=-1";

  # ------------------------------------------------------------------ guest
  web = evalGuest [{
    networking.hostName = "web";
    boot.kernelParams = [ "loglevel=4" ];
    nixvm.vcpu = 2;
    nixvm.mem = 1024;
    nixvm.interfaces = [ { type = "tap"; id = "vm-web"; mac = "02:00:00:00:00:01"; } ];
  }];
  webArgv = [
    nixvmBin
    "--kernel" "${toplevel "web"}/kernel"
    "--initrd" "${toplevel "web"}/initrd"
    "--cmdline" "loglevel=4 init=${toplevel "web"}/init regInfo=${regInfo} ${tail}"
    "--cpus" "2" "--memory" "1024M"
    "--net" "tap=vm-web,mac=02:00:00:00:00:01"
    "--fs" "tag=ro-store,path=/nix/store,readonly=on"
    "--api-socket" "web.sock"
    "--on-reboot" "restart"
    "--transport" "pci"
  ];

  guest = let c = web.config; vm = c.system.build.vm; in expect [
    { what = "nixvm.runner.argv"; got = c.nixvm.runner.argv; want = webArgv; }
    { what = "system.build.vm.argv"; got = vm.argv; want = webArgv; }
    { what = "runner name"; got = vm.runnerName; want = "run-web-vm"; }
    { what = "shutdown argv"; got = vm.shutdownArgv; want = [ nixvmBin "ctl" "--api-socket" "web.sock" "shutdown" ]; }
    (has "bin/run-web-vm in the package" vm.buildCommand "/bin/run-web-vm")
    (has "bin/shutdown-web-vm in the package" vm.buildCommand "/bin/shutdown-web-vm")
    { what = "initrd modules"; got = c.boot.initrd.kernelModules; want = [ "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_net" "virtiofs" "overlay" ]; }
    { what = "NICs named eth0, … (as qemu-vm.nix names them)"; got = c.networking.usePredictableInterfaceNames; want = false; }
    { what = "boot loader"; got = c.boot.loader.grub.enable; want = false; }
    { what = "/nix/.ro-store"; got = { inherit (c.fileSystems."/nix/.ro-store") device fsType neededForBoot; }; want = { device = "ro-store"; fsType = "virtiofs"; neededForBoot = true; }; }
    { what = "/nix/.rw-store"; got = c.fileSystems."/nix/.rw-store".fsType; want = "tmpfs"; }
    { what = "/"; got = c.fileSystems."/".fsType; want = "tmpfs"; }
    (has "store overlay in stage 1" c.boot.initrd.postMountCommands
      "mount -t overlay overlay $targetRoot/nix/store \\\n  -o lowerdir=$targetRoot/nix/.ro-store,upperdir=$targetRoot/nix/.rw-store/store,workdir=$targetRoot/nix/.rw-store/work")
    (has "regInfo loaded" c.boot.postBootCommands "/bin/nix-store --load-db")
    (has "the runner script runs the argv" (lib.head (lib.filter (x: lib.hasSuffix "run-web-vm" x.name) [ (pkgs.writeScript "run-web-vm" c.nixvm.runner.script) ])).text
      "exec \"$NIXVM\" '--kernel' '${toplevel "web"}/kernel'")
    # nixvm serves the store itself: the runner starts no virtiofsd.
    { what = "store share served by nixvm"; got = { inherit (lib.head vm.nixvmConfig.shares) tag source readOnly backend; }; want = { tag = "ro-store"; source = "/nix/store"; readOnly = true; backend = "nixvm"; }; }
    { what = "no virtiofsd in the runner"; got = lib.hasInfix "virtiofsd_pids" c.nixvm.runner.script || lib.hasInfix "--shared-dir" c.nixvm.runner.script; want = false; }
    { what = "/nix/.ro-store mounted ro"; got = c.fileSystems."/nix/.ro-store".options; want = [ "defaults" "ro" ]; }
  ];

  # Volumes, more shares, a read-only store, the systemd initrd, nixvm's settings.
  db = evalGuest [{
    networking.hostName = "db";
    boot.initrd.systemd.enable = true;
    nixvm = {
      package = drv "nixvm-custom" { };
      socket = null;
      writableStoreOverlay = null;
      onReboot = "exit";
      shutdownTimeout = 20;
      transport = "mmio";
      kernel = "/boot/vmlinux";
      volumes = [
        { image = "db-var.img"; mountPoint = "/var"; size = 1024; }
        { image = "/srv/vm/data.img"; mountPoint = "/data"; label = "data"; fsType = "xfs"; serial = "data"; direct = true; size = 4096; }
        { image = "/srv/vm/seed.img"; readOnly = true; autoCreate = false; }
      ];
      storeBackend = "virtiofsd";
      shares = [
        { tag = "home"; source = "/home/alice"; mountPoint = "/home/alice"; }
        { tag = "docs"; source = "/usr/share/doc"; mountPoint = "/docs"; readOnly = true; }
      ];
      interfaces = [
        { type = "macvtap"; id = "vm-db"; mac = "02:00:00:00:00:02"; macvtap.link = "eth0"; }
        { type = "user"; id = "user0"; }
      ];
      forwardPorts = [ { host.port = 2222; guest.port = 22; } { proto = "udp"; host.address = "127.0.0.1"; host.port = 5353; guest.port = 53; } ];
    };
  }];
  guest-volumes = let c = db.config; nv = "${store "nixvm-custom"}/bin/nixvm"; in expect [
    {
      what = "argv";
      got = c.nixvm.runner.argv;
      want = [
        nv "--kernel" "/boot/vmlinux" "--initrd" "${toplevel "db"}/initrd"
        "--cmdline" "init=${toplevel "db"}/init regInfo=${regInfo} ${tail}"
        "--cpus" "1" "--memory" "512M"
        "--disk" "path=db-var.img"
        "--disk" "path=/srv/vm/data.img,serial=data,direct=on"
        "--disk" "path=/srv/vm/seed.img,readonly=on"
        "--net" "fd=3,mac=02:00:00:00:00:02"
        "--net" "passt=${store "passt"}/bin/passt,forward=2222:22+udp:127.0.0.1/5353:53"
        "--fs" "tag=ro-store,socket=db-virtiofs-ro-store.sock"
        "--fs" "tag=home,socket=db-virtiofs-home.sock"
        "--fs" "tag=docs,path=/usr/share/doc,readonly=on"
        "--shutdown-timeout" "20" "--on-reboot" "exit" "--transport" "mmio"
      ];
    }
    { what = "no shutdown without a socket"; got = c.system.build.vm.shutdownArgv; want = null; }
    { what = "/var"; got = { inherit (c.fileSystems."/var") device fsType; }; want = { device = "/dev/vda"; fsType = "ext4"; }; }
    { what = "/data"; got = { inherit (c.fileSystems."/data") device fsType; }; want = { device = "/dev/disk/by-label/data"; fsType = "xfs"; }; }
    { what = "/home/alice"; got = { inherit (c.fileSystems."/home/alice") device fsType; }; want = { device = "home"; fsType = "virtiofs"; }; }
    { what = "read-only /nix/store"; got = { inherit (c.fileSystems."/nix/store") device options; }; want = { device = "/nix/.ro-store"; options = [ "bind" ]; }; }
    { what = "no rw-store"; got = c.fileSystems ? "/nix/.rw-store"; want = false; }
    { what = "no overlay module"; got = lib.elem "overlay" c.boot.initrd.kernelModules; want = false; }
    (has "volumes created" c.nixvm.runner.script "truncate -s '1024M' 'db-var.img'")
    (has "xfs labeled" c.nixvm.runner.script "'mkfs.xfs' '-L' 'data' '/srv/vm/data.img'")
    (has "mkfs on PATH" c.nixvm.runner.script "${store "xfsprogs"}/bin")
    { what = "seed.img not created"; got = lib.hasInfix "seed.img' ]" c.nixvm.runner.script; want = false; }
    (has "macvtap fd" c.nixvm.runner.script "exec 3<>\"/dev/tap$(cat /sys/class/net/'vm-db'/ifindex)\"")
    (has "virtiofsd for home" c.nixvm.runner.script "'--socket-path=db-virtiofs-home.sock' '--shared-dir=/home/alice' &")
    (has "virtiofsd for the store (storeBackend)" c.nixvm.runner.script "'--socket-path=db-virtiofs-ro-store.sock' '--shared-dir=/nix/store' '--readonly' &")
    { what = "no virtiofsd for docs"; got = lib.hasInfix "--shared-dir=/usr/share/doc" c.nixvm.runner.script; want = false; }
    { what = "/docs mounted ro"; got = c.fileSystems."/docs".options; want = [ "defaults" "ro" ]; }
    { what = "share backends"; got = map (x: x.backend) c.nixvm.shares; want = [ "virtiofsd" "nixvm" ]; }
    { what = "vsock, SSH over vsock and credentials";
      got = let c = (evalGuest [{ nixvm.vsock.cid = 9; nixvm.vsock.ssh.enable = true; nixvm.credentialFiles."tls.key" = "/run/secrets/k"; }]).config; in {
        args = lib.filter (x: lib.hasPrefix "cid=" x || lib.hasPrefix "tls.key=" x) c.nixvm.runner.argv;
        sshd = c.services.openssh.enable;
        module = builtins.elem "vmw_vsock_virtio_transport" c.boot.kernelModules;
      };
      want = { args = [ "cid=9,socket=nixos-vsock.sock" "tls.key=@/run/secrets/k" ]; sshd = true; module = true; }; }
    { what = "nixvm serves only read-only shares"; got = (builtins.tryEval (builtins.deepSeq (evalGuest [{ nixvm.shares = [ { tag = "w"; source = "/w"; mountPoint = "/w"; backend = "nixvm"; } ]; }]).config.nixvm.runner.argv true)).success; want = false; }
  ];

  # ------------------------------------------------------------------ host
  host = eval [
    ../modules/host.nix
    {
      nixvm.vms.web.vm = web.config.system.build.vm;
      nixvm.vms.db = {
        autostart = false;
        notify = false;
        config = {
          nixvm.shares = [
            { tag = "data"; source = "/srv/data"; mountPoint = "/data"; readOnly = true; }
            { tag = "home"; source = "/home/alice"; mountPoint = "/home/alice"; }
            { tag = "docs"; source = "/usr/share/doc"; mountPoint = "/docs"; readOnly = true; backend = "virtiofsd"; }
          ];
          nixvm.shutdownTimeout = 60;
        };
      };
    }
  ];
  host-test = let s = host.config.systemd.services; w = s."nixvm@web"; d = s."nixvm@db"; in expect [
    { what = "nixvm@web ExecStart"; got = w.serviceConfig.ExecStart; want = "\"${store "nixvm-web"}/bin/run-web-vm\""; }
    { what = "nixvm@web ExecStop"; got = w.serviceConfig.ExecStop; want = "-\"${nixvmBin}\" \"ctl\" \"--api-socket\" \"web.sock\" \"shutdown\""; }
    {
      what = "nixvm@web service";
      got = { inherit (w.serviceConfig) Type TimeoutStartSec User Group WorkingDirectory Restart TimeoutStopSec; inherit (w) wantedBy requires environment; };
      want = {
        Type = "notify"; TimeoutStartSec = 300;
        User = "nixvm"; Group = "kvm"; WorkingDirectory = "/var/lib/nixvm/web"; Restart = "on-failure"; TimeoutStopSec = 45;
        wantedBy = [ "multi-user.target" ];
        requires = [ "nixvm-tap-vm-web.service" ];
        environment.NIXVM_SKIP_VIRTIOFSD = "1";
      };
    }
    (has "TAP owned by the VM user" s.nixvm-tap-vm-web.script "tuntap add name 'vm-web' mode tap user 'nixvm' vnet_hdr")
    { what = "TAP removed at stop"; got = s.nixvm-tap-vm-web.serviceConfig.ExecStop; want = "${store "iproute2"}/bin/ip link delete vm-web"; }
    # nixvm serves the store (and other read-only shares) itself: no virtiofsd unit.
    { what = "no virtiofsd unit for the store"; got = lib.filter (lib.hasPrefix "nixvm-virtiofsd-") (builtins.attrNames s); want = [ "nixvm-virtiofsd-db-docs" "nixvm-virtiofsd-db-home" ]; }
    {
      what = "virtiofsd for a writable share";
      got = s.nixvm-virtiofsd-db-home.serviceConfig.ExecStart;
      want = "\"${store "virtiofsd"}/bin/virtiofsd\" \"--socket-path=/var/lib/nixvm/db/db-virtiofs-home.sock\" \"--socket-group=kvm\" \"--shared-dir=/home/alice\"";
    }
    {
      what = "virtiofsd for a read-only share given to it";
      got = s.nixvm-virtiofsd-db-docs.serviceConfig.ExecStart;
      want = "\"${store "virtiofsd"}/bin/virtiofsd\" \"--socket-path=/var/lib/nixvm/db/db-virtiofs-docs.sock\" \"--socket-group=kvm\" \"--shared-dir=/usr/share/doc\" \"--readonly\"";
    }
    (has "virtiofsd ready once its socket is there" s.nixvm-virtiofsd-db-home.postStart "[ -S '/var/lib/nixvm/db/db-virtiofs-home.sock' ] && exit 0")
    {
      what = "nixvm@db serves the store and data itself";
      got = lib.filter (a: lib.hasPrefix "tag=" a) host.config.nixvm.vms.db.vm.argv;
      want = [ "tag=ro-store,path=/nix/store,readonly=on" "tag=data,path=/srv/data,readonly=on" "tag=home,socket=db-virtiofs-home.sock" "tag=docs,socket=db-virtiofs-docs.sock" ];
    }
    # The VM declared by its configuration: evaluated with the guest module, named after it.
    { what = "nixvm@db ExecStart"; got = d.serviceConfig.ExecStart; want = "\"${store "nixvm-db"}/bin/run-db-vm\""; }
    { what = "nixvm@db not autostarted"; got = d.wantedBy; want = [ ]; }
    { what = "nixvm@db stop timeout"; got = d.serviceConfig.TimeoutStopSec; want = 75; }
    { what = "nixvm@db without readiness"; got = d.serviceConfig.Type; want = "simple"; }
    { what = "nixvm@db shares"; got = d.requires; want = [ "nixvm-virtiofsd-db-home.service" "nixvm-virtiofsd-db-docs.service" ]; }
    { what = "nixvm@db after its virtiofsd units"; got = lib.filter (lib.hasPrefix "nixvm-virtiofsd-") d.after; want = [ "nixvm-virtiofsd-db-home.service" "nixvm-virtiofsd-db-docs.service" ]; }
    { what = "state directories"; got = host.config.systemd.tmpfiles.rules; want = [ "d /var/lib/nixvm 0750 nixvm kvm -" "d /var/lib/nixvm/db 0770 nixvm kvm -" "d /var/lib/nixvm/web 0770 nixvm kvm -" ]; }
    { what = "user"; got = host.config.users.users.nixvm.group; want = "kvm"; }
  ];

  # ------------------------------------------------------------------ microvm.nix
  # Stand-ins for the microvm.nix options nixvm's backend reads (their names and defaults).
  microvmStandIns = { config, ... }: with lib; {
    options.microvm = {
      hypervisor = mkOption { type = types.enum [ "qemu" "cloud-hypervisor" ]; default = "qemu"; };
      runner = mkOption { type = types.attrsOf types.package; default = { }; };
      declaredRunner = mkOption { type = types.package; default = config.microvm.runner.${config.microvm.hypervisor}; };
      vcpu = mkOption { type = types.int; default = 1; };
      mem = mkOption { type = types.int; default = 512; };
      kernel = mkOption { type = types.package; default = drv "linux" { }; };
      initrdPath = mkOption { type = types.str; default = "${store "initrd"}/initrd"; };
      kernelParams = mkOption { type = types.listOf types.str; default = [ "init=${config.system.build.toplevel}/init" ]; };
      socket = mkOption { type = types.nullOr types.str; default = "${config.networking.hostName}.sock"; };
      preStart = mkOption { type = types.lines; default = ""; };
      user = mkOption { type = types.nullOr types.str; default = null; };
      balloon = mkOption { type = types.bool; default = false; };
      volumes = mkOption { type = types.listOf types.anything; default = [ ]; };
      shares = mkOption { type = types.listOf types.anything; default = [ ]; };
      interfaces = mkOption { type = types.listOf types.anything; default = [ ]; };
      binScripts = mkOption { type = types.attrsOf types.lines; default = { }; };
      prettyProcnames = mkOption { type = types.bool; default = true; };
      storeOnDisk = mkOption { type = types.bool; default = false; };
      storeDisk = mkOption { type = types.anything; default = drv "store-disk" { }; };
      registerWithMachined = mkOption { type = types.bool; default = false; };
      machineId = mkOption { type = types.nullOr types.str; default = null; };
      extraArgsScript = mkOption { type = types.nullOr types.str; default = null; };
      credentialFiles = mkOption { type = types.attrsOf types.path; default = { }; };
      vsock.cid = mkOption { type = types.nullOr types.int; default = null; };
      guest.enable = mkOption { type = types.bool; default = true; };
      optimize.enable = mkOption { type = types.bool; default = true; };
    };
  };
  mvm = extra: eval [
    microvmStandIns
    ../modules/microvm.nix
    {
      networking.hostName = "mvm";
      microvm = {
        hypervisor = "nixvm";
        vcpu = 2;
        storeOnDisk = true;
        volumes = [ { image = "var.img"; mountPoint = "/var"; size = 256; fsType = "ext4"; autoCreate = true; label = null; mkfsExtraArgs = [ ]; serial = null; direct = false; readOnly = false; } ];
        shares = [ { tag = "ro-store"; source = "/nix/store"; mountPoint = "/nix/.ro-store"; proto = "virtiofs"; socket = "mvm-virtiofs-ro-store.sock"; securityModel = "none"; } ];
        interfaces = [
          { type = "tap"; id = "vm-mvm"; mac = "02:00:00:00:00:03"; bridge = null; }
          { type = "macvtap"; id = "vm-mvm-m"; mac = "02:00:00:00:00:04"; macvtap = { link = "eth0"; mode = "bridge"; }; bridge = null; }
        ];
        binScripts.tap-up = "echo tap-up";
        # What microvm.nix's virtiofsd module adds for virtiofs shares.
        binScripts.virtiofsd-run = "echo virtiofsd-run";
        binScripts.virtiofsd-reload = "echo virtiofsd-reload";
        binScripts.virtiofsd-shutdown = "echo virtiofsd-shutdown";
      };
    }
    extra
  ];
  microvm = let r = (mvm { }).config.microvm.declaredRunner; in expect [
    { what = "hypervisor"; got = r.hypervisor; want = "nixvm"; }
    { what = "runner attributes"; got = { inherit (r) canShutdown supportsNotifySocket tapMultiQueue; }; want = { canShutdown = true; supportsNotifySocket = true; tapMultiQueue = false; }; }
    {
      what = "nixvm argv";
      got = r.nixvmArgv;
      want = [
        nixvmBin "--kernel" "${store "linux"}/bzImage" "--initrd" "${store "initrd"}/initrd"
        "--cmdline" "init=${toplevel "mvm"}/init ${tail}" "--cpus" "2" "--memory" "512M"
        "--disk" "path=${store "store-disk"},readonly=on"
        "--disk" "path=var.img"
        "--net" "tap=vm-mvm,mac=02:00:00:00:00:03"
        "--net" "fd=3,mac=02:00:00:00:00:04"
        "--fs" "tag=ro-store,path=/nix/store,readonly=on"
        "--api-socket" "mvm.sock"
        # Shares: virtio-pci, as microvm.nix's QEMU runner puts them.
        "--transport" "pci"
      ];
    }
    (has "microvm-run" r.buildCommand "/nix/store/${hash}-microvm-mvm-microvm-run $out/bin/microvm-run")
    (has "microvm-shutdown" r.buildCommand "$out/bin/microvm-shutdown")
    (has "binScripts kept" r.buildCommand "$out/bin/tap-up")
    (has "tap-interfaces" r.buildCommand "vm-mvm >> $out/share/microvm/tap-interfaces")
    (has "macvtap-interfaces" r.buildCommand "echo 'vm-mvm-m 02:00:00:00:00:04 eth0 bridge' >> $out/share/microvm/macvtap-interfaces")
    # nixvm serves the store: no virtiofsd for microvm.nix's host to start.
    { what = "no share/microvm/virtiofs"; got = lib.hasInfix "share/microvm/virtiofs" r.buildCommand; want = false; }
    { what = "no bin/virtiofsd-*"; got = lib.hasInfix "virtiofsd-" r.buildCommand; want = false; }
    # What microvm.nix's host module reads of the runner, and its share/microvm/hypervisor.
    { what = "machined attributes"; got = { inherit (r) registerWithMachined machineId; }; want = { registerWithMachined = false; machineId = null; }; }
    (has "share/microvm/hypervisor" r.buildCommand "echo nixvm > $out/share/microvm/hypervisor")
    # A systemd initrd, as microvm.nix gives cloud-hypervisor.
    { what = "systemd initrd"; got = (mvm { }).config.boot.initrd.systemd.enable; want = true; }
    { what = "no systemd initrd without optimize"; got = (mvm { microvm.optimize.enable = false; }).config.boot.initrd.systemd.enable; want = false; }
  ] ;
  # Beside the store, a writable share (a virtiofsd's) and a read-only one (nixvm's).
  microvmMixed = let r = (mvm {
    microvm.shares = [
      { tag = "data"; source = "/srv/data"; mountPoint = "/data"; proto = "virtiofs"; socket = "mvm-virtiofs-data.sock"; }
      { tag = "ro"; source = "/srv/ro"; mountPoint = "/ro"; proto = "virtiofs"; socket = "mvm-virtiofs-ro.sock"; readOnly = true; }
    ];
  }).config.microvm.declaredRunner; in expect [
    {
      what = "nixvm argv (mixed shares)";
      got = lib.filter (lib.hasPrefix "tag=") r.nixvmArgv;
      # (the module system puts the extra module's definitions first)
      want = [ "tag=data,socket=mvm-virtiofs-data.sock" "tag=ro,path=/srv/ro,readonly=on" "tag=ro-store,path=/nix/store,readonly=on" ];
    }
    (has "virtiofs socket of the writable share" r.buildCommand "mvm-virtiofs-data.sock > $out/share/microvm/virtiofs/data/socket")
    { what = "no virtiofs entry for the store"; got = lib.hasInfix "share/microvm/virtiofs/ro-store" r.buildCommand; want = false; }
    { what = "no virtiofs entry for the read-only share"; got = lib.hasInfix "share/microvm/virtiofs/ro/" r.buildCommand; want = false; }
    (has "bin/virtiofsd-run kept" r.buildCommand "$out/bin/virtiofsd-run")
  ];
  microvmScripts = let
    c = (mvm { }).config;
    hv = import ../microvm-runner.nix { microvmConfig = c.microvm // { hostName = "mvm"; }; nixvm = nixvmBin; path = [ "/tools/bin" ]; };
    run = (mvm { microvm.extraArgsScript = "/bin/more-args"; }).config.microvm.declaredRunner;
  in expect [
    # As microvm.nix's own runners: the script's output is more arguments.
    (has "extraArgsScript" run.scripts.microvm-run "runtime_args=$(/bin/more-args)")
    (has "runtime arguments passed" run.scripts.microvm-run "'pci' \${runtime_args:-}")
    { what = "shutdownCommand"; got = hv.shutdownCommand; want = "'${nixvmBin}' 'ctl' '--api-socket' 'mvm.sock' 'shutdown'"; }
    (has "preStart creates volumes" hv.preStart "truncate -s '256M' 'var.img'")
    # microvm@<name> runs with an empty PATH: the volumes bring their own.
    (has "volumes with their own PATH" hv.preStart "PATH='/tools/bin':$PATH")
    (has "macvtap fd opened" hv.openMacvtapFds "exec 3<>\"/dev/tap$(cat /sys/class/net/'vm-mvm-m'/ifindex)\"")
    (has "command" hv.command "'${nixvmBin}' '--kernel' '${store "linux"}/bzImage'")
  ];

  fails = cfg: !(builtins.tryEval (builtins.deepSeq (mvm cfg).config.microvm.declaredRunner.nixvmArgv true)).success;
  microvm-unsupported = expect [
    { what = "balloon rejected"; got = fails { microvm.balloon = true; }; want = true; }
    { what = "user rejected"; got = fails { microvm.user = "alice"; }; want = true; }
    { what = "9p rejected"; got = fails { microvm.shares = lib.mkForce [ { tag = "s"; source = "/s"; mountPoint = "/s"; proto = "9p"; socket = null; } ]; }; want = true; }
    { what = "qemu still a choice"; got = (mvm { microvm.hypervisor = lib.mkForce "qemu"; }).config.microvm.hypervisor; want = "qemu"; }
    { what = "credentialFiles and vsock.cid passed on";
      got = let a = (mvm { microvm.credentialFiles.secret = "/run/secrets/s"; microvm.vsock.cid = 5; }).config.microvm.declaredRunner.nixvmArgv;
        in lib.filter (x: lib.hasPrefix "secret=" x || lib.hasPrefix "cid=" x) a;
      want = [ "cid=5,socket=notify.vsock" "secret=@/run/secrets/s" ]; }
    { what = "registerWithMachined rejected"; got = fails { microvm.registerWithMachined = true; }; want = true; }
    { what = "no shares: virtio-mmio (no --transport), as microvm.nix's QEMU runner";
      got = lib.elem "--transport" (mvm { microvm.shares = lib.mkForce [ ]; }).config.microvm.declaredRunner.nixvmArgv; want = false; }
    { what = "microvm.nixvm.transport = \"mmio\"";
      got = lib.filter (x: x == "mmio") (mvm { microvm.nixvm.transport = "mmio"; }).config.microvm.declaredRunner.nixvmArgv; want = [ "mmio" ]; }
    { what = "qcow2 volumes rejected"; got = fails { microvm.volumes = lib.mkForce [ { image = "v.qcow2"; imageType = "qcow2"; size = 8; } ]; }; want = true; }
  ];

  # The flake's outputs, with a stand-in nixpkgs input (no network here).
  flake = let
    f = (import ../../flake.nix).outputs {
      self = f;
      nixpkgs = {
        inherit lib;
        legacyPackages.x86_64-linux = pkgs // {
          stdenv.hostPlatform.system = "x86_64-linux";
          rustPlatform.buildRustPackage = a: drv "${a.pname}-${a.version}" { inherit (a) cargoLock; };
        };
      };
    };
    g = eval [ f.nixosModules.guest { networking.hostName = "f"; } ];
  in expect [
    { what = "packages"; got = f.packages.x86_64-linux.nixvm.name; want = "nixvm-0.1.0"; }
    { what = "cargoLock"; got = baseNameOf (toString f.packages.x86_64-linux.nixvm.cargoLock.lockFile); want = "Cargo.lock"; }
    { what = "modules"; got = builtins.attrNames f.nixosModules; want = [ "guest" "host" "microvm" "test" "vm" ]; }
    { what = "guest module uses the flake's nixvm"; got = lib.head g.config.nixvm.runner.argv; want = "${store "nixvm-0.1.0"}/bin/nixvm"; }
    { what = "lib.runner"; got = (f.lib.runner { kernel = "/k"; }).argv; want = [ "nixvm" "--kernel" "/k" "--cmdline" tail "--cpus" "1" "--memory" "512M" "--api-socket" "nixvm.sock" ]; }
  ];
in
{
  # For nix/tests/microvm-real.nix: the stand-ins and helpers.
  _internals = { inherit pkgs drv store nixosStandIns eval expect has nixvmBin toplevel; };
  inherit guest guest-volumes microvm-unsupported flake;
  host = host-test;
  microvm = let l = [ microvm microvmMixed microvmScripts ]; in
    if lib.all (x: x == true) l then true
    else lib.concatStringsSep "\n" (lib.filter builtins.isString l);
}
