# nixvm as a microvm.nix hypervisor: what microvm.nix's lib/runners/<hypervisor>.nix return,
# made from microvm.nix's configuration (`config.microvm` with hostName) through
# nix/lib/runner.nix. nix/modules/microvm.nix builds the runner package from it.
#   command               nixvm's argv, quoted for sh
#   canShutdown           with a control socket (microvm.socket, default "<hostName>.sock")
#   shutdownCommand       `nixvm ctl --api-socket <socket> shutdown`: the ACPI power button,
#                         returning once nixvm has exited
#   preStart              microvm.preStart, then the volumes microvm.nix would create
#   supportsNotifySocket  true: nixvm relays the guest's sd_notify (READY=1, STATUS=,
#                         STOPPING=1) from its vsock to the unit's NOTIFY_SOCKET itself
#                         (no socat); the guest gets the vmm.notify_socket credential
#   tapMultiQueue         false: nixvm's virtio-net has one queue pair
#   requiresMacvtapAsFds  true: macvtaps are inherited fds (from 3 on, one per interface)
#   virtiofsdShares       the shares a virtiofsd still has to serve (on their `socket`)
# Shares of the host's /nix/store (source "/nix/store") and shares with readOnly = true
# (microvm.nix's own share options have no readOnly) are served by nixvm itself, read-only
# (runner.nix's backend "nixvm"); the others by a virtiofsd on their socket, as microvm.nix
# does it. microvm.nix features nixvm does not have fail evaluation, saying which.
# The virtio devices are on virtio-pci when the VM has shares and on virtio-mmio otherwise: the
# bus microvm.nix's QEMU runner (its default hypervisor, on QEMU's `microvm` machine) gives the
# same configuration; `transport` ("mmio" or "pci") overrides it.
{ microvmConfig
, nixvm ? "nixvm"
, pkgs ? null
, macvtapFds ? null
, extraArgs ? [ ]
, transport ? null
  # Directories put on PATH where volumes are created (coreutils, mkfs.*).
, path ? [ ]
, ...
}:
let
  mc = microvmConfig;
  get = n: d: mc.${n} or d;
  unsupported = what: throw "nixvm (microvm.hypervisor = \"nixvm\") does not support ${what}";
  check = cond: what: if cond then unsupported what else true;

  checks = builtins.all (x: x) [
    (check ((get "user" null) != null) "microvm.user: run the runner as the user instead")
    (check ((get "cpu" null) != null) "microvm.cpu (CPU emulation)")
    (check (get "balloon" false) "microvm.balloon")
    (check ((get "hotplugMem" 0) > 0) "microvm.hotplugMem (virtio-mem)")
    (check (get "hugepageMem" false) "microvm.hugepageMem")
    (check ((get "graphics" { enable = false; }).enable or false) "microvm.graphics")
    (check ((get "devices" [ ]) != [ ]) "microvm.devices (PCI/USB passthrough)")
    (check (get "registerWithMachined" false) "microvm.registerWithMachined (no bin/microvm-register yet)")
    (check (builtins.any (v: (v.imageType or "raw") != "raw") (get "volumes" [ ]))
      "microvm.volumes.*.imageType other than \"raw\" (nixvm's disks are raw images)")
  ];

  storeOnDisk = get "storeOnDisk" false;

  # The store (read-only in the guest anyway) and read-only shares: served by nixvm itself.
  servedByNixvm = s: (s.readOnly or false) || (s.source or null) == "/nix/store";
  shares = map (s:
    if servedByNixvm s then s // { readOnly = true; backend = "nixvm"; }
    else s // { backend = "virtiofsd"; }) (get "shares" [ ]);
  kernel = mc.kernel;

  runner = import ./lib/runner.nix {
    name = mc.hostName;
    inherit nixvm;
    inherit (mc) vcpu mem;
    kernel = "${kernel}/bzImage";
    initrd = mc.initrdPath;
    kernelParams = mc.kernelParams;
    socket = get "socket" null;
    # With the store on a disk image, it is the first disk (/dev/vda), read-only.
    volumes = (if storeOnDisk then [ { image = "${mc.storeDisk}"; readOnly = true; } ] else [ ])
      ++ map (v: v // { autoCreate = (v.autoCreate or true) && (v.size or null) != null; }) (get "volumes" [ ]);
    inherit shares;
    interfaces = get "interfaces" [ ];
    # microvm.nix's "user" interfaces and forwardPorts: nixvm's passt networking.
    forwardPorts = get "forwardPorts" [ ];
    passt = if pkgs != null && pkgs ? passt then "${pkgs.passt}/bin/passt" else "passt";
    # microvm.vsock.cid, with cloud-hypervisor's socket name (`ssh vsock-mux/notify.vsock`
    # works the same).
    vsock = { cid = (get "vsock" { }).cid or null; socket = "notify.vsock"; };
    credentials = get "credentialFiles" { };
    transport = if transport != null then transport else if get "shares" [ ] != [ ] then "pci" else null;
    inherit extraArgs path;
  };
in
assert checks;
{
  command = runner.command;
  canShutdown = runner.shutdownArgv != null;
  shutdownCommand =
    if runner.shutdownCommand != null then runner.shutdownCommand
    else throw "nixvm: cannot shut down without microvm.socket";
  preStart = (get "preStart" "") + "\n" + runner.volumesScript;
  supportsNotifySocket = true;
  tapMultiQueue = false;
  requiresMacvtapAsFds = true;
  # For the module: the fds the runner must open, and the whole runner.nix result.
  openMacvtapFds = runner.macvtapScript;
  virtiofsdShares = builtins.filter (s: s.backend == "virtiofsd") runner.config.shares;
  inherit runner;
}
