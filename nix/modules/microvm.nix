# nixvm as a microvm.nix hypervisor. Import it beside microvm.nix's guest module and set
#   microvm.hypervisor = "nixvm";
# It adds "nixvm" to microvm.hypervisor's choices and builds `microvm.runner.nixvm` the way
# microvm.nix builds its runners (bin/microvm-run, bin/microvm-shutdown, microvm.binScripts,
# share/microvm/…), from nix/microvm-runner.nix; microvm.nix's host module (microvm@<name>,
# its TAP and virtiofsd units) runs it unchanged.
#
# The host's /nix/store share (and any share with readOnly = true) is served by nixvm itself,
# read-only: it is left out of share/microvm/virtiofs/, and when no share is left for a
# virtiofsd, microvm.nix's bin/virtiofsd-run (with virtiofsd-reload and virtiofsd-shutdown) is
# left out too, so that microvm-virtiofsd@<name> (ConditionPathExists on it) does not start.
# With other shares beside it, bin/virtiofsd-run is microvm.nix's own, which starts a
# virtiofsd for every virtiofs share, the store's included (nixvm does not connect to that
# one). microvm.nix's share options have no readOnly: there, only the store's share is nixvm's.
{ config, lib, pkgs, ... }:
let
  mcfg = config.microvm;
  hostName = config.networking.hostName;

  hv = import ../microvm-runner.nix {
    inherit pkgs;
    microvmConfig = mcfg // { inherit hostName; hypervisor = "nixvm"; };
    nixvm = "${mcfg.nixvm.package}/bin/nixvm";
    inherit (mcfg.nixvm) extraArgs transport;
    # microvm@<name> has an empty PATH: volume creation brings its own tools.
    path = map (p: "${p}/bin") [ pkgs.coreutils pkgs.e2fsprogs pkgs.dosfstools pkgs.xfsprogs pkgs.btrfs-progs ];
  };

  execArg = lib.optionalString (mcfg.prettyProcnames or false) ''-a "microvm@${hostName}"'';

  # microvm.nix's virtiofsd scripts (bin/virtiofsd-run is what its host module starts), kept
  # only while some share still needs a virtiofsd.
  virtiofsdScripts = [ "virtiofsd-run" "virtiofsd-reload" "virtiofsd-shutdown" ];
  binScripts = (if hv.virtiofsdShares == [ ] then removeAttrs (mcfg.binScripts or { }) virtiofsdScripts
    else mcfg.binScripts or { }) // {
    # As microvm.nix's lib/runner.nix: extraArgsScript's output becomes more arguments.
    microvm-run = ''
      set -eou pipefail
      ${hv.preStart}
      ${hv.openMacvtapFds}
      runtime_args=${lib.optionalString ((mcfg.extraArgsScript or null) != null) "$(${mcfg.extraArgsScript})"}
      exec ${execArg} ${hv.command} ''${runtime_args:-}
    '';
  } // lib.optionalAttrs hv.canShutdown {
    microvm-shutdown = hv.shutdownCommand;
  };

  binScriptPkgs = lib.mapAttrs (n: text: pkgs.writeShellScript "microvm-${hostName}-${n}" text) binScripts;

  runnerPackage = pkgs.runCommand "microvm-nixvm-${hostName}" {
    meta.mainProgram = "microvm-run";
    # What microvm.nix's host module reads of a runner (microvm@<name>'s Type, machined).
    passthru = {
      inherit (hv) canShutdown supportsNotifySocket tapMultiQueue command;
      hypervisor = "nixvm";
      registerWithMachined = mcfg.registerWithMachined or false;
      machineId = mcfg.machineId or null;
      nixvmArgv = hv.runner.argv;
      # The bin/ scripts' texts.
      scripts = binScripts;
    };
  } ''
    mkdir -p $out/bin $out/share/microvm
    ${lib.concatStrings (lib.mapAttrsToList (n: p: ''
      ln -s ${p} $out/bin/${n}
    '') binScriptPkgs)}
    ${lib.optionalString (mcfg.systemSymlink or true) ''
      ln -s ${config.system.build.toplevel} $out/share/microvm/system
    ''}
    echo nixvm > $out/share/microvm/hypervisor
    echo vnet_hdr > $out/share/microvm/tap-flags
    ${lib.concatMapStrings (i: lib.optionalString (i.type == "tap") ''
      echo ${lib.escapeShellArg i.id} >> $out/share/microvm/tap-interfaces
    '') mcfg.interfaces}
    ${lib.concatMapStrings (i: lib.optionalString (i.type == "macvtap" && (i.macvtap.link or null) != null) ''
      echo ${lib.escapeShellArg "${i.id} ${i.mac} ${i.macvtap.link} ${toString i.macvtap.mode}"} >> $out/share/microvm/macvtap-interfaces
    '') mcfg.interfaces}
    ${lib.concatMapStrings (s: ''
      mkdir -p $out/share/microvm/virtiofs/${s.tag}
      echo ${lib.escapeShellArg s.socket} > $out/share/microvm/virtiofs/${s.tag}/socket
      echo ${lib.escapeShellArg s.source} > $out/share/microvm/virtiofs/${s.tag}/source
    '') hv.virtiofsdShares}
  '';
in
{
  options.microvm = {
    # Merged with microvm.nix's enum of hypervisors.
    hypervisor = lib.mkOption { type = lib.types.enum [ "nixvm" ]; };
    nixvm = {
      package = lib.mkOption {
        type = lib.types.package;
        default = pkgs.nixvm or (throw "microvm.nixvm.package is not set (use nixvm's flake, or an overlay with pkgs.nixvm)");
        defaultText = lib.literalExpression "pkgs.nixvm";
        description = "The nixvm package microvm.nix's runner uses.";
      };
      extraArgs = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "More nixvm arguments.";
      };
      transport = lib.mkOption {
        type = lib.types.nullOr (lib.types.enum [ "mmio" "pci" ]);
        default = null;
        description = ''
          How the virtio devices attach (--transport): null for the bus microvm.nix's QEMU runner
          gives the same configuration (virtio-pci when there are shares, else virtio-mmio),
          "pci" (virtio-pci with MSI-X: nixvm's faster I/O) or "mmio".
        '';
      };
    };
  };

  config = lib.mkMerge [
    { microvm.runner.nixvm = runnerPackage; }
    # microvm.nix gives the hypervisors it knows a systemd initrd (optimize.enable); nixvm is
    # one of them as cloud-hypervisor is.
    (lib.mkIf ((mcfg.hypervisor or null) == "nixvm" && (mcfg.guest.enable or true) && (mcfg.optimize.enable or true)) {
      boot.initrd.systemd.enable = lib.mkDefault true;
    })
  ];
}
