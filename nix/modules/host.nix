# nixvm's NixOS host module: declarative VMs, `nixvm.vms.<name>`.
#
# Each VM gets:
#   nixvm@<name>.service   its runner (bin/run-<hostName>-vm of the guest's system.build.vm)
#                          in /var/lib/nixvm/<name>, as the unprivileged user nixvm in group
#                          kvm; ExecStop = `nixvm ctl … shutdown` (the ACPI power button, then
#                          waits for nixvm to exit); Restart=on-failure (a poweroff, exit 0,
#                          stays down);
#   nixvm-tap-<id>.service a TAP (or macvtap) per interface, owned by the VM's user;
#   nixvm-virtiofsd-<name>-<tag>.service  a virtiofsd per share with backend "virtiofsd"
#                          (writable shares, by default), ready only once its socket exists
#                          (the runner is told, NIXVM_SKIP_VIRTIOFSD=1, not to start its own).
#                          Shares with backend "nixvm" (read-only ones, the store among them)
#                          need no unit: nixvm serves them itself, as the VM's user.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf types literalExpression;
  cfg = config.nixvm.host;
  vms = config.nixvm.vms;
  guestModule = ./guest.nix;

  # One ExecStart=/ExecStop= argument, quoted for systemd.
  sdArg = s: "\"" + builtins.replaceStrings [ "\\" "\"" "%" "$" ] [ "\\\\" "\\\"" "%%" "$$" ] (toString s) + "\"";
  sdArgv = argv: lib.concatStringsSep " " (map sdArg argv);
  # Single-quoted for sh (always, whatever lib.escapeShellArg's version does).
  sh = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";

  dir = name: "${cfg.stateDir}/${name}";
  # A path the runner takes relative to its working directory.
  inDir = name: p: if lib.hasPrefix "/" p then p else "${dir name}/${p}";

  # The runner's passthru (system.build.vm of nixvm's guest module) says what it needs.
  vmOf = name: vm: vm.vm;
  nixvmConfigOf = name: vm: (vmOf name vm).nixvmConfig;

  ip = "${pkgs.iproute2}/bin/ip";

  tapUnit = name: vm: i:
    let
      unit = "nixvm-tap-${i.id}";
      up =
        if i.type == "tap" then ''
          ${ip} link delete ${sh i.id} 2>/dev/null || true
          ${ip} tuntap add name ${sh i.id} mode tap user ${sh cfg.user} vnet_hdr
          ${lib.optionalString ((i.bridge or null) != null) "${ip} link set ${sh i.id} master ${sh i.bridge}"}
          ${ip} link set ${sh i.id} up
        '' else ''
          ${ip} link delete ${sh i.id} 2>/dev/null || true
          ${ip} link add link ${sh (i.macvtap.link or (throw "nixvm.vms.${name}: macvtap ${i.id} has no macvtap.link"))} name ${sh i.id} type macvtap mode ${sh (i.macvtap.mode or "bridge")}
          ${lib.optionalString ((i.mac or null) != null) "${ip} link set ${sh i.id} address ${sh i.mac}"}
          ${ip} link set ${sh i.id} up
          chown ${sh cfg.user}:${sh cfg.group} /dev/tap$(cat /sys/class/net/${sh i.id}/ifindex)
        '';
    in
    lib.nameValuePair unit {
      description = "nixvm: ${i.type} ${i.id} of VM ${name}";
      before = [ "nixvm@${name}.service" ];
      partOf = [ "nixvm@${name}.service" ];
      after = [ "network-pre.target" ];
      path = [ pkgs.coreutils ];
      script = up;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStop = "${ip} link delete ${i.id}";
      };
    };

  virtiofsdUnit = name: vm: s:
    let
      unit = "nixvm-virtiofsd-${name}-${s.tag}";
      socket = inDir name s.socket;
    in
    lib.nameValuePair unit {
      description = "nixvm: virtiofsd for ${s.source} (${s.tag}) of VM ${name}";
      before = [ "nixvm@${name}.service" ];
      partOf = [ "nixvm@${name}.service" ];
      after = [ "local-fs.target" "systemd-tmpfiles-setup.service" ];
      path = [ pkgs.coreutils ];
      # Ready once the socket is there: nixvm@ starts after this.
      postStart = ''
        for _ in $(seq 300); do [ -S ${sh socket} ] && exit 0; sleep 0.1; done
        echo "virtiofsd did not create ${socket}" >&2; exit 1
      '';
      serviceConfig = {
        Type = "simple";
        WorkingDirectory = dir name;
        ExecStartPre = "${pkgs.coreutils}/bin/rm -f ${sdArg socket}";
        ExecStart = sdArgv ([ "${cfg.virtiofsd}/bin/virtiofsd"
          "--socket-path=${socket}" "--socket-group=${cfg.group}" "--shared-dir=${s.source}" ]
          ++ lib.optional (s.readOnly or false) "--readonly" ++ cfg.virtiofsdArgs);
        Restart = "on-failure";
        RestartSec = "1s";
        LimitNOFILE = 1048576;
      };
    };

  vmUnits = name: vm:
    let
      v = vmOf name vm;
      c = nixvmConfigOf name vm;
      # "user" interfaces need nothing on the host: nixvm starts their passt.
      taps = map (i: tapUnit name vm i) (builtins.filter (i: i.type != "user") c.interfaces);
      # Shares nixvm serves itself (backend "nixvm") need nothing here.
      fsds = map (s: virtiofsdUnit name vm s)
        (builtins.filter (s: (s.backend or "virtiofsd") == "virtiofsd") c.shares);
      deps = map (u: "${u.name}.service") (taps ++ fsds);
      timeout = if c.shutdownTimeout == null then 30 else c.shutdownTimeout;
    in
    [
      (lib.nameValuePair "nixvm@${name}" {
        description = "nixvm VM ${name}";
        wantedBy = lib.optional vm.autostart "multi-user.target";
        requires = deps;
        after = [ "network.target" "systemd-tmpfiles-setup.service" ] ++ deps;
        restartTriggers = [ vm.vm ];
        restartIfChanged = vm.restartIfChanged;
        environment.NIXVM_SKIP_VIRTIOFSD = "1";
        serviceConfig = {
          # notify: active once the guest's systemd reports READY=1, which nixvm relays
          # from the guest (vsock, the vmm.notify_socket credential) to NOTIFY_SOCKET.
          Type = if vm.notify then "notify" else "simple";
          TimeoutStartSec = vm.startTimeout;
          User = cfg.user;
          Group = cfg.group;
          WorkingDirectory = dir name;
          ExecStart = sdArg "${vm.vm}/bin/${v.runnerName}";
          Restart = "on-failure";
          RestartSec = "5s";
          TimeoutStopSec = timeout + 15;
          LimitMEMLOCK = "infinity";
          SyslogIdentifier = "nixvm@${name}";
        } // lib.optionalAttrs (v.shutdownArgv != null) {
          # `-`: after the guest powered off by itself there is nobody to ask.
          ExecStop = "-" + sdArgv v.shutdownArgv;
        };
      })
    ] ++ taps ++ fsds;

  vmType = types.submodule ({ name, config, ... }: {
    options = {
      config = mkOption {
        type = types.nullOr types.deferredModule;
        default = null;
        description = ''
          The guest's NixOS configuration (nixvm's guest module is added, and
          networking.hostName defaults to the VM's name). Or set `vm`.
        '';
      };
      vm = mkOption {
        type = types.package;
        description = ''
          The guest's runner: its `config.system.build.vm` (e.g.
          `self.nixosConfigurations.web.config.system.build.vm`). Default: built from `config`.
        '';
      };
      autostart = mkOption { type = types.bool; default = true; description = "Start the VM at boot."; };
      restartIfChanged = mkOption { type = types.bool; default = false; description = "Restart the VM when a switch changes it."; };
      notify = mkOption {
        type = types.bool;
        default = true;
        description = ''
          The unit is Type=notify: active when the guest's systemd (v254 or later, as in
          NixOS 23.11 on) reports that it finished booting. Off for guests without such a
          systemd: the unit is active as soon as nixvm runs.
        '';
      };
      startTimeout = mkOption {
        type = types.int;
        default = 300;
        description = "Seconds the guest has to finish booting (TimeoutStartSec) with `notify`.";
      };
    };
    config.vm = mkIf (config.config != null) (lib.mkDefault
      (pkgs.nixos {
        imports = [ guestModule config.config ];
        networking.hostName = lib.mkDefault name;
        nixvm.package = lib.mkDefault cfg.package;
      }).config.system.build.vm);
  });
in
{
  options.nixvm = {
    vms = mkOption {
      type = types.attrsOf vmType;
      default = { };
      description = "VMs this host runs under nixvm, each as nixvm@<name>.service.";
    };
    host = {
      package = mkOption {
        type = types.package;
        default = pkgs.nixvm or (throw "nixvm.host.package is not set (use nixvm's flake, or an overlay with pkgs.nixvm)");
        defaultText = literalExpression "pkgs.nixvm";
        description = "nixvm for guests declared through `config` and for the host's PATH.";
      };
      virtiofsd = mkOption {
        type = types.package;
        default = pkgs.virtiofsd;
        defaultText = literalExpression "pkgs.virtiofsd";
        description = "The virtiofsd serving shares with backend \"virtiofsd\".";
      };
      virtiofsdArgs = mkOption { type = types.listOf types.str; default = [ ]; description = "More virtiofsd arguments."; };
      user = mkOption { type = types.str; default = "nixvm"; description = "The unprivileged user VMs run as."; };
      group = mkOption { type = types.str; default = "kvm"; description = "Its group: /dev/kvm's."; };
      stateDir = mkOption { type = types.str; default = "/var/lib/nixvm"; description = "VMs run in <stateDir>/<name>."; };
    };
  };

  config = mkIf (vms != { }) {
    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.group;
      home = cfg.stateDir;
    };
    users.groups.${cfg.group} = { };
    boot.kernelModules = [ "tun" "kvm-intel" "kvm-amd" ];
    environment.systemPackages = [ cfg.package ];
    systemd.tmpfiles.rules = [ "d ${cfg.stateDir} 0750 ${cfg.user} ${cfg.group} -" ]
      ++ map (name: "d ${dir name} 0770 ${cfg.user} ${cfg.group} -") (builtins.attrNames vms);
    systemd.services = builtins.listToAttrs (lib.concatLists (lib.mapAttrsToList vmUnits vms));
  };
}
