# nixvm's runner library: a pure function (builtins only, no nixpkgs) from a VM description
# to the nixvm command line and the runner script that starts it.
#
#   (import ./runner.nix) { name = "web"; kernel = "/nix/store/…/bzImage"; … }
#     => { argv = [ "nixvm" "--kernel" … ]; script = "#!/bin/sh …"; … }
#
# The description uses microvm.nix's attribute names, with its defaults where one is left out:
#   name          the VM's host name (microvm.nix: hostName)                "nixvm"
#   vcpu, mem     vCPUs; RAM in MiB                                          1, 512
#   kernel        bzImage or PVH vmlinux (required)
#   initrd        initial ramdisk                                            null
#   kernelParams  list of strings (or one string); bootParams are appended  []
#   socket        the control socket (--api-socket); null: none            "<name>.sock"
#   volumes       [{ image; readOnly ? false; serial ? null; direct ? false;
#                    size ? null (MiB; with it a missing image is created); autoCreate ? true;
#                    fsType ? "ext4" (null: created without a file system); label ? null;
#                    mkfsExtraArgs ? []; … }]
#   shares        [{ tag; source; mountPoint; proto ? "virtiofs" (the only one nixvm has;
#                    microvm.nix's default is 9p); readOnly ? false;
#                    backend ? (if readOnly then "nixvm" else "virtiofsd") (nixvm's):
#                      "nixvm": nixvm serves `source` itself, read-only (--fs
#                        tag=…,path=<source>,readonly=on): no socket, no virtiofsd; only
#                        for readOnly shares;
#                      "virtiofsd": a virtiofsd listening on `socket` (--fs tag=…,socket=…),
#                        with --readonly when readOnly;
#                    socket ? "<name>-virtiofs-<tag>.sock" (backend virtiofsd only); … }]
#   interfaces    [{ type = "tap" | "macvtap" | "user" | "local" | "vde"; id; mac ? null (nixvm
#                 derives one); … }]
#                 "user": user-mode networking through a passt nixvm starts (--net passt),
#                 no root or TAP needed (microvm.nix's and QEMU's SLiRP "user" type);
#                 "local": a link to nixvm alone, which answers DHCP, ARP and ping as the
#                 gateway 10.0.2.2 (--net local; where passt cannot run, e.g. the build sandbox);
#                 "vde": a port on a vde_switch (--net vde=DIR), DIR given as `socket`, or as
#                 `socketEnv`, an environment variable the script reads when it runs (the
#                 NixOS test driver's QEMU_VDE_SOCKET_<vlan>)
#   forwardPorts  host ports to the guest through the "user" interface, in qemu-vm.nix's
#                 and microvm.nix's form: [{ from ? "host"; proto ? "tcp"; host.address ?
#                 ""; host.port; guest.address ? ""; guest.port }]                  []
#   preStart      shell commands run before nixvm                           ""
# and nixvm's own:
#   nixvm         the binary (argv[0]); the script uses $NIXVM when set    "nixvm"
#   bootParams    appended to kernelParams          [ "console=ttyS0" "reboot=k" "panic=-1" ]
#   serial        --serial (ttyS0): stdio, off, file=…, socket=…, connect=…    "stdio"
#   console       --console (a virtio-console, hvc0): the same kinds; "off": none  "off"
#   rng           --rng on|off                                               true
#   shutdownTimeout  --shutdown-timeout SECS                                 null (nixvm's 30)
#   onReboot      --on-reboot exit|restart                                  null (nixvm's exit)
#   transport     --transport mmio|pci: pci for virtio-pci with MSI-X      null (nixvm's mmio)
#   extraArgs     more nixvm arguments                                       []
#   shell         the script's interpreter                                  "/bin/sh"
#   path          directories put first on PATH where volumes are created (truncate,
#                 mkfs.*): in the script and in volumesScript                []
#   virtiofsd     the virtiofsd the script starts per virtiofsd share      "virtiofsd"
#   virtiofsdArgs more virtiofsd arguments                                   []
#   passt         the passt nixvm starts for a "user" interface             "passt"
#   cmdlineEnv    an environment variable whose value the script appends to the kernel
#                 command line at run time (qemu-vm.nix's QEMU_KERNEL_PARAMS)   null
#   vsock         { cid; socket ? null } (--vsock cid=…,socket=…): host programs reach
#                 guest ports through `socket` (CONNECT <port>), the guest host port P
#                 through `<socket>_P`                                        { cid = null; }
#   credentials   systemd credentials from files, { NAME = path; } (--credential
#                 NAME=@path; microvm.nix's credentialFiles)                 { }
#
# The result: argv (argv[0] = nixvm), script (the runner: creates missing volumes, opens
# macvtap fds, starts a virtiofsd per share with backend virtiofsd unless
# NIXVM_SKIP_VIRTIOFSD=1, runs nixvm with argv and then the script's own arguments, as
# qemu-vm.nix's run-<name>-vm passes "$@" to QEMU; QEMU options, and $QEMU_OPTS, go after
# `--`, where nixvm maps them; with no share it simply execs nixvm),
# shutdownArgv (nixvm ctl … shutdown, or null without a socket), shutdownScript, cmdline,
# command and shutdownCommand (the argvs quoted for sh), volumesScript and macvtapScript (the
# script's parts that create volumes and open macvtap fds), and the description with its
# defaults filled in (config).
desc:
let
  inherit (builtins)
    attrNames concatLists concatStringsSep filter isList isString replaceStrings throw toString;

  fail = msg: throw "nixvm runner.nix: ${msg}";

  known = [
    "name" "vcpu" "mem" "kernel" "initrd" "kernelParams" "socket" "volumes" "shares"
    "interfaces" "preStart" "nixvm" "bootParams" "serial" "console" "rng" "shutdownTimeout"
    "onReboot" "extraArgs" "shell" "path" "virtiofsd" "virtiofsdArgs" "forwardPorts" "passt"
    "cmdlineEnv" "vsock" "credentials" "transport"
  ];
  unknown = filter (n: !(builtins.elem n known)) (attrNames desc);

  name = desc.name or "nixvm";
  c = {
    inherit name;
    vcpu = 1;
    mem = 512;
    initrd = null;
    kernelParams = [ ];
    socket = "${name}.sock";
    volumes = [ ];
    shares = [ ];
    interfaces = [ ];
    preStart = "";
    nixvm = "nixvm";
    bootParams = [ "console=ttyS0" "reboot=k" "panic=-1" ];
    serial = "stdio";
    console = "off";
    rng = true;
    shutdownTimeout = null;
    onReboot = null;
    transport = null;
    extraArgs = [ ];
    shell = "/bin/sh";
    path = [ ];
    virtiofsd = "virtiofsd";
    virtiofsdArgs = [ ];
    forwardPorts = [ ];
    passt = "passt";
    cmdlineEnv = null;
    vsock = { cid = null; };
    credentials = { };
  } // desc // {
    kernel = desc.kernel or (fail "`kernel` is required");
  };

  str = toString;
  hasComma = s: builtins.match ".*,.*" s != null;
  # A value inside a comma-separated nixvm spec (path=…,serial=…) must not hold a comma.
  specValue = what: v:
    let s = str v; in
    if hasComma s then fail "${what} `${s}` contains a comma, which nixvm's option syntax cannot carry"
    else if s == "" then fail "${what} is empty"
    else s;

  # Single-quote for sh. An argument the script computes when it runs is { shell; } (sh text
  # that is one word), put in the script as it is.
  q = s: if builtins.isAttrs s then s.shell else "'" + replaceStrings [ "'" ] [ "'\\''" ] (str s) + "'";

  kernelParams = if isString c.kernelParams then [ c.kernelParams ] else c.kernelParams;
  cmdline = concatStringsSep " " (filter (p: p != "") (map str (kernelParams ++ c.bootParams)));

  volumes = map (v: {
    readOnly = false;
    serial = null;
    direct = false;
    autoCreate = true;
    fsType = "ext4";
    label = null;
    mkfsExtraArgs = [ ];
  } // v // {
    image = specValue "volume image" (v.image or (fail "a volume has no `image`"));
  }) c.volumes;

  shares = map (s:
    let
      tag = s.tag or (fail "a share has no `tag`");
      withDefaults = {
        proto = "virtiofs";
        readOnly = false;
        socket = "${name}-virtiofs-${tag}.sock";
      } // s;
    in
    { backend = if withDefaults.readOnly then "nixvm" else "virtiofsd"; } // withDefaults // {
      tag = specValue "share tag" tag;
    }) c.shares;
  checkedShares = map (s:
    if s.proto != "virtiofs" then fail "share `${s.tag}`: nixvm serves only virtiofs shares, not ${s.proto}"
    else if s.backend == "nixvm" then
      if !s.readOnly then fail "share `${s.tag}`: backend nixvm serves only read-only shares (set readOnly = true, or backend = \"virtiofsd\")"
      else s // { source = specValue "share source" (s.source or (fail "share `${s.tag}` has no `source`")); }
    else if s.backend == "virtiofsd" then
      if s.socket == null then fail "share `${s.tag}` has no socket"
      else s // { socket = specValue "share socket" s.socket; }
    else fail "share `${s.tag}`: backend must be nixvm or virtiofsd, not ${str s.backend}") shares;
  # The shares a virtiofsd serves (the script starts one for each); nixvm serves the others.
  virtiofsdShares = filter (s: s.backend == "virtiofsd") checkedShares;
  fsSpec = s:
    if s.backend == "nixvm" then "tag=${s.tag},path=${s.source},readonly=on"
    else "tag=${s.tag},socket=${s.socket}";

  # macvtap interfaces get inherited fds from 3 on, one each (nixvm has one queue pair), in
  # the order microvm.nix numbers them.
  macvtaps = filter (i: i.type == "macvtap") c.interfaces;
  macvtapFd = id:
    let go = n: l: if l == [ ] then fail "no macvtap ${id}"
      else if (builtins.head l).id == id then n else go (n + 1) (builtins.tail l);
    in go 3 macvtaps;
  macOpt = i: if (i.mac or null) == null then "" else ",mac=${specValue "MAC" i.mac}";
  netSpec = i:
    if !(i ? type) then fail "an interface has no `type`"
    else if !(i ? id) then fail "an interface has no `id`"
    else if i.type == "tap" then "tap=${specValue "TAP name" i.id}${macOpt i}"
    else if i.type == "macvtap" then "fd=${str (macvtapFd i.id)}${macOpt i}"
    else if i.type == "user" then
      "passt=${specValue "passt" c.passt}"
      + (if users == [ ] || (builtins.head users).id != i.id || c.forwardPorts == [ ] then ""
         else ",forward=${concatStringsSep "+" (map forwardSpec c.forwardPorts)}")
      + macOpt i
    else if i.type == "local" then "local${macOpt i}"
    else if i.type == "vde" then
      if (i.socket or null) != null && (i.socketEnv or null) == null then "vde=${specValue "VDE socket" i.socket}${macOpt i}"
      else if (i.socket or null) == null && builtins.match "[A-Za-z_][A-Za-z0-9_]*" (i.socketEnv or "") != null then {
        # The variable's value is the switch's directory; nixvm names it if it is no switch.
        shell = "vde=\"\${${i.socketEnv}:?run-${name}-vm: ${i.socketEnv} (the vde_switch of interface ${i.id}) is not set}\"${macOpt i}";
      }
      else fail "interface `${i.id}`: type vde needs `socket` or `socketEnv` (a variable name), one of them"
    else fail "interface `${i.id}`: type ${i.type} is not supported by nixvm (tap, macvtap, user, local or vde)";

  # forwardPorts go to the first "user" interface, as QEMU's go to its one user netdev.
  users = filter (i: (i.type or null) == "user") c.interfaces;
  forwardSpec = f:
    let
      from = f.from or "host";
      proto = f.proto or "tcp";
      hostAddr = f.host.address or "";
      guestAddr = f.guest.address or "";
      port = what: p: if builtins.isInt p && p > 0 && p < 65536 then str p
        else fail "forwardPorts: ${what} port must be 1 to 65535, not ${builtins.toJSON p}";
    in
    if from != "host" then fail "forwardPorts: from = \"${from}\" (guest-to-host forwarding) is not supported by nixvm's passt networking; the guest reaches the host's loopback at its gateway address"
    else if proto != "tcp" && proto != "udp" then fail "forwardPorts: proto must be tcp or udp, not ${proto}"
    else if guestAddr != "" then fail "forwardPorts: guest.address cannot be chosen (passt forwards to the guest's own address)"
    else (if proto == "udp" then "udp:" else "")
      + (if hostAddr == "" then "" else "${specValue "forwardPorts host.address" hostAddr}/")
      + "${port "host" (f.host.port or null)}:${port "guest" (f.guest.port or null)}";

  diskSpec = v:
    "path=${v.image}"
    + (if v.readOnly then ",readonly=on" else "")
    + (if v.serial == null then "" else ",serial=${specValue "volume serial" v.serial}")
    + (if v.direct then ",direct=on" else "");

  opt = cond: l: if cond then l else [ ];
  flag = f: values: concatLists (map (v: [ f v ]) values);

  bootArgs = [ "--kernel" (str c.kernel) ] ++ opt (c.initrd != null) [ "--initrd" (str c.initrd) ];
  args = bootArgs ++ [ "--cmdline" cmdline ] ++ restArgs;
  restArgs =
    [ "--cpus" (str c.vcpu) "--memory" "${str c.mem}M" ]
    ++ opt (c.serial != "stdio") [ "--serial" c.serial ]
    ++ opt (c.console != "off") [ "--console" c.console ]
    ++ flag "--disk" (map diskSpec volumes)
    ++ flag "--net" (map netSpec c.interfaces)
    ++ flag "--fs" (map fsSpec checkedShares)
    ++ opt (!c.rng) [ "--rng" "off" ]
    ++ opt (c.socket != null) [ "--api-socket" (str c.socket) ]
    ++ opt (c.shutdownTimeout != null) [ "--shutdown-timeout" (str c.shutdownTimeout) ]
    ++ opt (c.onReboot != null) [ "--on-reboot" c.onReboot ]
    ++ opt (c.transport != null) [ "--transport" c.transport ]
    ++ opt ((c.vsock.cid or null) != null) [ "--vsock" vsockSpec ]
    ++ flag "--credential" (map (n: "${n}=@${str c.credentials.${n}}") (attrNames c.credentials))
    ++ map str c.extraArgs;

  vsockSpec = "cid=${str c.vsock.cid}"
    + (if (c.vsock.socket or null) == null then "" else ",socket=${specValue "vsock socket" c.vsock.socket}");

  # The script's computed words appear as their sh text.
  argv = [ (str c.nixvm) ] ++ map (a: if builtins.isAttrs a then a.shell else a) args;

  shutdownArgv =
    if c.socket == null then null
    else [ (str c.nixvm) "ctl" "--api-socket" (str c.socket) "shutdown" ]
      ++ opt (c.shutdownTimeout != null) [ "--timeout" (str c.shutdownTimeout) ];

  qArgs = l: concatStringsSep " " (map q l);

  createVolume = v:
    if !(v.autoCreate && (v.size or null) != null) then "" else ''
      if [ ! -e ${q v.image} ]; then
        echo "run-${name}-vm: creating ${v.image} (${str v.size} MiB, ${if v.fsType == null then "no file system" else v.fsType})" >&2
        truncate -s ${q "${str v.size}M"} ${q v.image}
        ${if v.fsType == null then "" else qArgs ([ "mkfs.${v.fsType}" ]
          ++ opt (v.label != null) [ (if v.fsType == "vfat" then "-n" else "-L") v.label ]
          ++ v.mkfsExtraArgs ++ [ v.image ]) + " >&2"}
      fi
    '';

  openMacvtap = i: ''
    exec ${str (macvtapFd i.id)}<>"/dev/tap$(cat /sys/class/net/${q i.id}/ifindex)"
  '';

  startVirtiofsd = s: ''
      rm -f ${q s.socket}
      ${qArgs ([ c.virtiofsd "--socket-path=${s.socket}" "--shared-dir=${str s.source}" ]
        ++ opt s.readOnly [ "--readonly" ] ++ c.virtiofsdArgs)} &
      virtiofsd_pids="$virtiofsd_pids $!"
  '';

  # The command line, with the environment's addition when cmdlineEnv names a variable.
  qCmdline = q cmdline + (if c.cmdlineEnv == null then ""
    else "\"\${${c.cmdlineEnv}:+ \$${c.cmdlineEnv}}\"");
  run = "\"$NIXVM\" ${qArgs bootArgs} '--cmdline' ${qCmdline} ${qArgs restArgs} \"$@\"";
  pathLine = if c.path == [ ] then "" else "PATH=${q (concatStringsSep ":" (map str c.path))}:$PATH\n";
  creates = concatStringsSep "" (map createVolume volumes);
  # With its own PATH: microvm.nix's microvm@ unit has an empty one.
  volumesScript = if creates == "" then "" else pathLine + creates;
  macvtapScript = concatStringsSep "" (map openMacvtap macvtaps);

  script = ''
    #!${c.shell}
    # run-${name}-vm: starts the VM ${name} with nixvm (generated by nixvm's nix/lib/runner.nix).
    # NIXVM=/path/to/nixvm overrides the binary; NIXVM_SKIP_VIRTIOFSD=1 leaves the virtiofsd
    # back ends to someone else (the host module's units). Read-only shares with backend
    # nixvm need neither: nixvm serves them itself.
    set -eu
    NIXVM=''${NIXVM:-${q c.nixvm}}
    # QEMU options (what the NixOS test driver appends, and $QEMU_OPTS as qemu-vm.nix's
    # runner takes it): nixvm maps them after `--`. nixvm's own options start with `--`.
    case "''${1-}" in
      --*) ;;
      *) set -- -- "$@" ''${QEMU_OPTS-} ;;
    esac
  '' + pathLine + c.preStart + "\n"
  + volumesScript
  + macvtapScript
  + (if virtiofsdShares == [ ] then ''
    exec ${run}
  '' else ''
    if [ "''${NIXVM_SKIP_VIRTIOFSD:-0}" = 1 ]; then
      exec ${run}
    fi
    virtiofsd_pids=
    ${concatStringsSep "" (map startVirtiofsd virtiofsdShares)}
    # nixvm runs in the background (stdin passed on explicitly), this shell forwards SIGTERM
    # and SIGHUP to it, and stops the virtiofsd daemons once it has exited.
    exec 9<&0
    ${run} <&9 &
    vm=$!
    trap 'kill -TERM "$vm" 2>/dev/null || :' TERM
    trap 'kill -HUP "$vm" 2>/dev/null || :' HUP
    trap : INT
    status=0
    wait "$vm" || status=$?
    while kill -0 "$vm" 2>/dev/null; do status=0; wait "$vm" || status=$?; done
    kill $virtiofsd_pids 2>/dev/null || :
    wait $virtiofsd_pids 2>/dev/null || :
    exit "$status"
  '');

  shutdownScript =
    if shutdownArgv == null then null else ''
      #!${c.shell}
      # Shuts the VM ${name} down: the ACPI power button, then waits until nixvm has exited.
      set -eu
      NIXVM=''${NIXVM:-${q c.nixvm}}
      exec "$NIXVM" ${qArgs (builtins.tail shutdownArgv)} "$@"
    '';

  checked =
    if unknown != [ ] then fail "unknown attribute(s) ${concatStringsSep ", " unknown}"
    else if !(builtins.isInt c.vcpu) || c.vcpu < 1 then fail "vcpu must be a positive integer"
    else if !(builtins.isInt c.mem) || c.mem < 64 then fail "mem must be an integer of MiB, at least 64"
    else if c.onReboot != null && c.onReboot != "exit" && c.onReboot != "restart" then fail "onReboot must be exit or restart"
    else if c.transport != null && c.transport != "mmio" && c.transport != "pci" then fail "transport must be mmio or pci"
    else if !(isList c.volumes && isList c.shares && isList c.interfaces && isList c.forwardPorts) then fail "volumes, shares, interfaces and forwardPorts are lists"
    else if c.forwardPorts != [ ] && users == [ ] then fail "forwardPorts needs an interface of type \"user\" (passt) to forward through"
    else true;
in
assert checked;
{
  inherit argv script shutdownArgv shutdownScript cmdline volumesScript macvtapScript;
  # The argv, and the shutdown argv, quoted for sh.
  command = qArgs argv;
  shutdownCommand = if shutdownArgv == null then null else qArgs shutdownArgv;
  config = c // { inherit volumes; shares = checkedShares; kernelParams = kernelParams; };
}
