{
  description = "nixvm: a KVM virtual machine monitor for NixOS guests, its runner, NixOS modules and microvm.nix backend";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      nixvmFor = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.nixvm;
    in
    {
      packages = forAll (pkgs: {
        nixvm = pkgs.rustPlatform.buildRustPackage {
          pname = "nixvm";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).workspace.package.version;
          src = nixpkgs.lib.cleanSource ./.;
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [ "-p" "nixvm" ];
          # The end-to-end tests boot guests on /dev/kvm: not in the sandbox.
          cargoTestFlags = [ "--workspace" "--lib" "--bins" ];
          meta = {
            description = "A KVM virtual machine monitor for NixOS guests";
            mainProgram = "nixvm";
            platforms = systems;
          };
        };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.nixvm;
      });

      overlays.default = final: prev: { nixvm = nixvmFor final; };

      # The guest: system.build.vm with bin/run-<hostName>-vm.
      nixosModules.guest = { pkgs, lib, ... }: {
        imports = [ ./nix/modules/guest.nix ];
        nixvm.package = lib.mkDefault (nixvmFor pkgs);
      };
      # The host: nixvm.vms.<name>, nixvm@<name>.service.
      nixosModules.host = { pkgs, lib, ... }: {
        imports = [ ./nix/modules/host.nix ];
        nixvm.host.package = lib.mkDefault (nixvmFor pkgs);
      };
      # nixos-rebuild build-vm: virtualisation.vmVariant's system.build.vm runs on nixvm.
      nixosModules.vm = { pkgs, lib, ... }: {
        imports = [ ./nix/modules/vm.nix ];
        virtualisation.nixvm.package = lib.mkDefault (nixvmFor pkgs);
      };
      # NixOS tests: `defaults.imports = [ nixvm.nixosModules.test ];` runs the nodes on nixvm.
      nixosModules.test = { pkgs, lib, ... }: {
        imports = [ ./nix/modules/test.nix ];
        virtualisation.nixvm.package = lib.mkDefault (nixvmFor pkgs);
      };
      # microvm.nix: beside its guest module, microvm.hypervisor = "nixvm".
      nixosModules.microvm = { pkgs, lib, ... }: {
        imports = [ ./nix/modules/microvm.nix ];
        microvm.nixvm.package = lib.mkDefault (nixvmFor pkgs);
      };

      # nix/lib/runner.nix: a VM description (microvm.nix's names) to nixvm's argv and runner.
      lib.runner = import ./nix/lib/runner.nix;
      lib.microvmRunner = import ./nix/microvm-runner.nix;
    };
}
