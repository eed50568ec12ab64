#!/usr/bin/env bash
# nix-tests.sh: the tests of nixvm's Nix side (nix/, flake.nix). From anywhere:
#   resources/nix-tests.sh [FILTER]        FILTER: run only the tests whose name contains it
# Needs nix-instantiate (Debian: apt-get install nix-bin; Nix 2.8 is enough) and no network.
#   - parse: `nix-instantiate --parse` of every .nix file;
#   - runner/*: nix/lib/runner.nix on the descriptions of nix/tests/runner-cases.nix: the
#     argv equals the expected one (and the runner script holds, or lacks, what the case
#     says), and target/debug/nixvm accepts it with --dry-run; descriptions it cannot run
#     fail to evaluate, saying why;
#   - script/*: the generated runner and shutdown scripts run (volumes created, virtiofsd
#     started and stopped for the shares nixvm does not serve itself, nixvm run with the
#     argv); the fake-toplevel runner of
#     resources/nix-runner-boot.sh (which the e2e harness boots) passes --dry-run;
#   - modules/*: the guest, host and microvm.nix modules evaluated with lib.evalModules of
#     the real nixpkgs lib, where NIXPKGS_LIB points to a checkout of nix-community/nixpkgs.lib
#     (otherwise they print "skipped: NIXPKGS_LIB is not set"); modules/microvm-real-*
#     evaluate the microvm.nix backend inside microvm.nix's real guest options and host
#     module, from a checkout that MICROVM_NIX points to (skipped without it);
#     modules/vm-real-* evaluate nixosModules.vm (build-vm) inside nixpkgs' real build-vm.nix
#     and qemu-vm.nix, from the directory NIXPKGS points to (skipped without it).
# Environment: NIXVM (default target/debug/nixvm), NIXVM_ASSETS (default target/e2e-assets,
# from resources/assets.sh), NIXPKGS_LIB, MICROVM_NIX, NIXPKGS. Prints "nix: NAME ... ok|FAILED|skipped: why" per
# test; exits 1 when one failed. Under CI=true a missing nixvm or missing assets is a failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
FILTER=${1:-}
NIXVM=${NIXVM:-target/debug/nixvm}
ASSETS=${NIXVM_ASSETS:-target/e2e-assets}
case $NIXVM in /*) ;; *) NIXVM=$ROOT/$NIXVM ;; esac
case $ASSETS in /*) ;; *) ASSETS=$ROOT/$ASSETS ;; esac

passed=0 failed=0 skipped=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/nixvm-nix-tests.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

wants() { [ -z "$FILTER" ] || [[ $1 == *"$FILTER"* ]]; }
ok() { echo "nix: $1 ... ok"; passed=$((passed + 1)); }
failed() {
  echo "nix: $1 ... FAILED"
  shift
  [ $# -eq 0 ] || printf '%s\n' "$@" | sed 's/^/    /'
  failed=$((failed + 1))
}
skip() { echo "nix: $1 ... skipped: $2"; skipped=$((skipped + 1)); }
# A missing prerequisite of nixvm's own build is a failure in CI.
skip_or_fail() { if [ "${CI:-}" = true ]; then failed "$1" "$2"; else skip "$1" "$2"; fi; }

# Nix itself, as resources/dev.sh installs its packages: Debian's nix-bin through apt.
if ! command -v nix-instantiate >/dev/null && command -v apt-get >/dev/null; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  echo "nix-tests.sh: installing nix-bin (apt-get)" >&2
  { "${sudo[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends nix-bin; } >/dev/null 2>&1
fi
if ! command -v nix-instantiate >/dev/null; then
  skip_or_fail all "nix-instantiate is not installed (Debian: apt-get install nix-bin)"
  [ "$failed" -eq 0 ]
  exit
fi

# Evaluation only: the dummy store (no store database, no daemon, any user), no network.
nix_json() { nix-instantiate --store dummy:// --eval --strict --json -E "$1"; }
nix_raw() {
  nix --extra-experimental-features nix-command --store dummy:// eval --impure --raw --expr "$1"
}
# A Nix string literal.
nstr() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\$/\\\$}; printf '"%s"' "$s"; }

RUNNER="$ROOT/nix/lib/runner.nix"

# ---------------------------------------------------------------- parse

if wants parse; then
  errs=()
  while IFS= read -r f; do
    out=$(nix-instantiate --store dummy:// --parse "$f" 2>&1 >/dev/null) || errs+=("$f: $out")
  done < <(find nix flake.nix -name '*.nix' 2>/dev/null | sort)
  if [ ${#errs[@]} -eq 0 ]; then ok parse; else failed parse "${errs[@]}"; fi
fi

# ---------------------------------------------------------------- runner.nix

have_vm=
if [ ! -x "$NIXVM" ]; then
  why="no $NIXVM (cargo build -p nixvm)"
elif [ ! -f "$ASSETS/vmlinuz" ] || [ ! -f "$ASSETS/initramfs.cpio.gz" ]; then
  why="no $ASSETS/vmlinuz or initramfs.cpio.gz (resources/assets.sh $ASSETS)"
else
  have_vm=1
fi

CASES_DIR=$TMP/cases
mkdir -p "$CASES_DIR/sock" "$CASES_DIR/ro"
for i in a b c; do truncate -s 1M "$CASES_DIR/$i.img"; done
CASES="(import $(nstr "$ROOT/nix/tests/runner-cases.nix") { assets = $(nstr "$ASSETS"); dir = $(nstr "$CASES_DIR"); })"

mapfile -t case_names < <(nix_raw "builtins.concatStringsSep \"\\n\" (builtins.attrNames $CASES)")
[ ${#case_names[@]} -gt 0 ] || failed runner/cases "nix/tests/runner-cases.nix did not evaluate"
for c in "${case_names[@]}"; do
  name=runner/$c
  wants "$name" || continue
  is_error=$(nix_json "$CASES.\"$c\" ? error")
  if [ "$is_error" = true ]; then
    want=$(nix_raw "$CASES.\"$c\".error")
    if out=$(nix_json "((import $(nstr "$RUNNER")) $CASES.\"$c\".desc)" 2>&1); then
      failed "$name" "evaluated, but should have failed with: $want" "$out"
    elif [[ $out != *"$want"* ]]; then
      failed "$name" "failed, but without \"$want\":" "$out"
    else
      ok "$name"
    fi
    continue
  fi
  got=$(nix_json "((import $(nstr "$RUNNER")) $CASES.\"$c\".desc).argv" 2>&1)
  want=$(nix_json "$CASES.\"$c\".argv" 2>&1)
  if [ "$got" != "$want" ]; then
    failed "$name" "argv: $got" "want: $want"
    continue
  fi
  # What the runner script must hold (scriptHas) and must not (scriptLacks).
  script_errs=()
  if ! script=$(nix_raw "((import $(nstr "$RUNNER")) $CASES.\"$c\".desc).script" 2>&1); then
    script_errs+=("the script did not render: $script")
  else
    mapfile -t has < <(nix_raw "builtins.concatStringsSep \"\\n\" ($CASES.\"$c\".scriptHas or [ ])")
    mapfile -t lacks < <(nix_raw "builtins.concatStringsSep \"\\n\" ($CASES.\"$c\".scriptLacks or [ ])")
    for x in "${has[@]}"; do
      [ -z "$x" ] || [[ $script == *"$x"* ]] || script_errs+=("the script lacks: $x")
    done
    for x in "${lacks[@]}"; do
      [ -z "$x" ] || [[ $script != *"$x"* ]] || script_errs+=("the script holds: $x")
    done
  fi
  if [ ${#script_errs[@]} -gt 0 ]; then
    failed "$name" "${script_errs[@]}" "script:" "$script"
    continue
  fi
  if [ -z "$have_vm" ]; then
    skip_or_fail "$name" "argv ok; --dry-run not run: $why"
    continue
  fi
  mapfile -t argv < <(nix_raw "builtins.concatStringsSep \"\\n\" ((import $(nstr "$RUNNER")) $CASES.\"$c\".desc).argv")
  if out=$(cd "$CASES_DIR" && "$NIXVM" "${argv[@]:1}" --dry-run 2>&1); then
    ok "$name"
  else
    failed "$name" "nixvm ${argv[*]:1} --dry-run failed:" "$out"
  fi
done

# ---------------------------------------------------------------- runner scripts

# Renders the runner script of the description (Nix text) into FILE.
render() { # FILE DESC [ATTR]
  nix_raw "((import $(nstr "$RUNNER")) ($2)).${3:-script}" > "$1" && chmod +x "$1"
}

# Volumes created with truncate and mkfs.<fsType> from `path`, a virtiofsd started per share
# with backend virtiofsd (not for the read-only share nixvm serves) and stopped once nixvm has
# exited, nixvm (the real one, with --dry-run) run with the argv.
if wants script/run; then
  name=script/run
  d=$TMP/script-run
  mkdir -p "$d/bin" "$d/vm" "$d/ro"
  cat > "$d/bin/mkfs.fake" <<'EOF'
#!/bin/sh
echo "mkfs.fake $*" >> mkfs.log
EOF
  cat > "$d/bin/virtiofsd" <<'EOF'
#!/bin/sh
echo "virtiofsd $*" >> virtiofsd.log
echo $$ >> virtiofsd.pids
exec sleep 60
EOF
  # nixvm after a moment: the virtiofsd daemons, started in the background, have logged.
  printf '#!/bin/sh\nsleep 0.5\nexec "$REAL_NIXVM" "$@"\n' > "$d/slow-nixvm"
  chmod +x "$d/bin/"* "$d/slow-nixvm"
  desc="{ name = \"s\"; kernel = $(nstr "$ASSETS/vmlinuz"); initrd = $(nstr "$ASSETS/initramfs.cpio.gz");
    path = [ $(nstr "$d/bin") ]; virtiofsd = $(nstr "$d/bin/virtiofsd");
    preStart = \"echo prestart > prestart.log\";
    volumes = [ { image = \"new.img\"; size = 3; fsType = \"fake\"; label = \"var\"; }
                { image = \"old.img\"; size = 5; fsType = \"fake\"; }
                { image = \"ro.img\"; readOnly = true; } ];
    shares = [ { tag = \"ro-store\"; source = $(nstr "$d/ro"); readOnly = true; } { tag = \"data\"; source = \"/srv\"; }
               { tag = \"docs\"; source = \"/usr/share/doc\"; readOnly = true; backend = \"virtiofsd\"; } ];
    extraArgs = [ \"--dry-run\" ]; }"
  truncate -s 1M "$d/vm/old.img" "$d/vm/ro.img"
  errs=()
  if ! render "$d/run" "$desc"; then
    errs+=("the script did not render")
  elif [ -z "$have_vm" ]; then
    errs+=(skip)
  else
    out=$(cd "$d/vm" && REAL_NIXVM=$NIXVM NIXVM=$d/slow-nixvm "$d/run" 2>&1 </dev/null) || errs+=("the runner failed: $out")
    [ "$(stat -c %s "$d/vm/new.img" 2>/dev/null)" = 3145728 ] || errs+=("new.img was not created with 3 MiB")
    [ "$(stat -c %s "$d/vm/old.img")" = 1048576 ] || errs+=("old.img was touched")
    [ "$(cat "$d/vm/mkfs.log" 2>/dev/null)" = "mkfs.fake -L var new.img" ] ||
      errs+=("mkfs: $(cat "$d/vm/mkfs.log" 2>/dev/null)")
    [ "$(cat "$d/vm/prestart.log" 2>/dev/null)" = prestart ] || errs+=("preStart did not run")
    # Started in the background: in either order.
    want_v="virtiofsd --socket-path=s-virtiofs-data.sock --shared-dir=/srv
virtiofsd --socket-path=s-virtiofs-docs.sock --shared-dir=/usr/share/doc --readonly"
    [ "$(sort "$d/vm/virtiofsd.log" 2>/dev/null)" = "$want_v" ] ||
      errs+=("virtiofsd runs: $(cat "$d/vm/virtiofsd.log" 2>/dev/null)")
    sleep 0.2
    for p in $(cat "$d/vm/virtiofsd.pids" 2>/dev/null); do
      ! kill -0 "$p" 2>/dev/null || { errs+=("virtiofsd $p still runs"); kill "$p"; }
    done
    [[ $out == *'"tag": "ro-store"'* && $out == *"\"path\": \"$d/ro\""* && $out == *'"path": "new.img"'* ]] ||
      errs+=("nixvm --dry-run printed: $out")
  fi
  if [ "${errs[*]}" = skip ]; then skip_or_fail "$name" "$why"
  elif [ ${#errs[@]} -eq 0 ]; then ok "$name"
  else failed "$name" "${errs[@]}"; fi
fi

# NIXVM_SKIP_VIRTIOFSD=1 (the host module's units serve the shares): nixvm is exec'd with
# the very argv and then the runner's own arguments (as qemu-vm.nix's runner passes "$@"),
# and its exit status is the runner's; the shutdown script runs nixvm ctl.
if wants script/exec; then
  name=script/exec
  d=$TMP/script-exec
  mkdir -p "$d"
  cat > "$d/fake-nixvm" <<'EOF'
#!/bin/sh
[ -n "${OUT:-}" ] && printf '%s\n' "$0" "$@" > "$OUT"
exit 3
EOF
  chmod +x "$d/fake-nixvm"
  desc="{ name = \"e\"; kernel = \"/k\"; nixvm = $(nstr "$d/fake-nixvm"); virtiofsd = \"/nonexistent\";
    kernelParams = [ \"a='b c'\" \"x\\\"y\" ]; socket = \"api sock\"; shutdownTimeout = 7;
    shares = [ { tag = \"ro-store\"; source = \"/nix/store\"; } ]; }"
  errs=()
  if ! render "$d/run" "$desc" || ! render "$d/stop" "$desc" shutdownScript; then
    errs+=("the scripts did not render")
  else
    (cd "$d" && NIXVM_SKIP_VIRTIOFSD=1 OUT=$d/argv "$d/run" --serial 'file=a b' >/dev/null 2>&1)
    rc=$?
    [ "$rc" = 3 ] || errs+=("exit status $rc, want nixvm's 3")
    nix_raw "builtins.concatStringsSep \"\\n\" ((import $(nstr "$RUNNER")) ($desc)).argv" > "$d/want"
    printf '\n%s\n%s\n' --serial 'file=a b' >> "$d/want"
    cmp -s "$d/argv" "$d/want" || errs+=("nixvm got:" "$(cat "$d/argv" 2>/dev/null)" "want:" "$(cat "$d/want")")
    (cd "$d" && OUT=$d/stop-argv "$d/stop" >/dev/null 2>&1)
    printf '%s\n' "$d/fake-nixvm" ctl --api-socket "api sock" shutdown --timeout 7 > "$d/want-stop"
    cmp -s "$d/stop-argv" "$d/want-stop" || errs+=("shutdown ran: $(cat "$d/stop-argv" 2>/dev/null)")
  fi
  if [ ${#errs[@]} -eq 0 ]; then ok "$name"; else failed "$name" "${errs[@]}"; fi
fi

# resources/nix-runner-boot.sh renders a runner for a fake toplevel (the e2e harness boots
# it); here it runs against nixvm --dry-run.
if wants script/fake-toplevel; then
  name=script/fake-toplevel
  d=$TMP/fake-toplevel
  mkdir -p "$d"
  printf '#!/bin/sh\nexec "$REAL_NIXVM" --dry-run "$@"\n' > "$d/dry-nixvm"
  chmod +x "$d/dry-nixvm"
  if [ -z "$have_vm" ]; then
    skip_or_fail "$name" "$why"
  elif ! out=$(resources/nix-runner-boot.sh --render-only "$d/vm" 2>&1); then
    failed "$name" "nix-runner-boot.sh --render-only failed:" "$out"
  elif ! out=$(cd "$d/vm" && REAL_NIXVM=$NIXVM NIXVM=$d/dry-nixvm ./bin/run-fake-vm 2>&1 </dev/null); then
    failed "$name" "the rendered runner failed with --dry-run:" "$out"
  elif [[ $out != *"nixvm.action=poweroff init=$d/vm/system/init regInfo=$d/vm/closure-info/registration console=ttyS0 reboot=k panic=-1"* ]]; then
    failed "$name" "unexpected configuration:" "$out"
  else
    ok "$name"
  fi
fi

# The same runner given QEMU options, as the NixOS test driver gives them (and $QEMU_OPTS):
# nixvm maps them; one it cannot map stops it, named.
if wants script/qemu-options; then
  name=script/qemu-options
  d=$TMP/fake-toplevel
  if [ -z "$have_vm" ]; then
    skip_or_fail "$name" "$why"
  elif [ ! -x "$d/vm/bin/run-fake-vm" ]; then
    failed "$name" "script/fake-toplevel did not render the runner"
  elif ! out=$(cd "$d/vm" && QEMU_OPTS=-nographic REAL_NIXVM=$NIXVM NIXVM=$d/dry-nixvm \
      ./bin/run-fake-vm -serial none -device virtio-rng-pci -no-reboot 2>&1 </dev/null); then
    failed "$name" "the runner refused the test driver's QEMU options:" "$out"
  elif [[ $out != *'"serial": "off"'* || $out != *'"on_reboot": "exit"'* ]]; then
    failed "$name" "the QEMU options did not become nixvm's settings:" "$out"
  elif out=$(cd "$d/vm" && REAL_NIXVM=$NIXVM NIXVM=$d/dry-nixvm ./bin/run-fake-vm -vga std 2>&1 </dev/null); then
    failed "$name" "the runner took -vga:" "$out"
  elif [[ $out != *'`-vga`'* ]]; then
    failed "$name" "-vga was refused without naming it:" "$out"
  else
    ok "$name"
  fi
fi

# A test machine's NICs: eth0 on nixvm's local network, a vlan NIC on the vde_switch whose
# directory the driver puts in QEMU_VDE_SOCKET_<n> (read when the runner starts; a clear
# message when it is not set).
if wants script/vde-socket-env; then
  name=script/vde-socket-env
  d=$TMP/vde-socket-env
  mkdir -p "$d"
  printf '#!/bin/sh\nexec "$REAL_NIXVM" --dry-run "$@"\n' > "$d/dry-nixvm"
  chmod +x "$d/dry-nixvm"
  desc="{ name = \"v\"; kernel = $(nstr "$ASSETS/vmlinuz"); nixvm = $(nstr "$d/dry-nixvm"); socket = null;
    interfaces = [ { type = \"local\"; id = \"user0\"; mac = \"52:54:00:12:34:56\"; }
      { type = \"vde\"; id = \"eth1\"; socketEnv = \"QEMU_VDE_SOCKET_1\"; mac = \"52:54:00:12:01:02\"; } ]; }"
  if [ -z "$have_vm" ]; then
    skip_or_fail "$name" "$why"
  elif ! render "$d/run" "$desc"; then
    failed "$name" "the runner did not render"
  elif ! out=$(cd "$d" && QEMU_VDE_SOCKET_1="$d/vde 1.ctl" REAL_NIXVM=$NIXVM ./run -no-reboot 2>&1 </dev/null); then
    failed "$name" "the runner failed:" "$out"
  elif [[ $out != *'"local": true'* || $out != *"\"vde\": \"$d/vde 1.ctl\""* || $out != *'"mac": "52:54:00:12:01:02"'* ]]; then
    failed "$name" "the NICs are not the driver's:" "$out"
  elif out=$(cd "$d" && REAL_NIXVM=$NIXVM ./run 2>&1 </dev/null); then
    failed "$name" "the runner started without QEMU_VDE_SOCKET_1:" "$out"
  elif [[ $out != *'QEMU_VDE_SOCKET_1 (the vde_switch of interface eth1) is not set'* ]]; then
    failed "$name" "no clear message without QEMU_VDE_SOCKET_1:" "$out"
  else
    ok "$name"
  fi
fi

# ---------------------------------------------------------------- modules

MODULE_TESTS=$ROOT/nix/tests/modules.nix
if [ -f "$MODULE_TESTS" ]; then
  mapfile -t module_tests < <(nix_raw "builtins.concatStringsSep \"\\n\" (import $(nstr "$MODULE_TESTS") { names = true; })")
  for t in "${module_tests[@]}"; do
    name=modules/$t
    wants "$name" || continue
    if [ -z "${NIXPKGS_LIB:-}" ]; then
      skip "$name" "NIXPKGS_LIB is not set"
      continue
    fi
    lib=$NIXPKGS_LIB
    [ -e "$lib/lib/default.nix" ] && lib=$lib/lib
    if out=$(nix_json "(import $(nstr "$MODULE_TESTS") { lib = import $(nstr "$lib"); }).\"$t\"" 2>&1); then
      if [ "$out" = true ]; then
        ok "$name"
      else
        failed "$name" "$(nix_raw "(import $(nstr "$MODULE_TESTS") { lib = import $(nstr "$lib"); }).\"$t\"" 2>&1)"
      fi
    else
      failed "$name" "$out"
    fi
  done
fi

# Tests against trees CI cannot download (never committed; without them they skip):
#   real_tests FILE ARG VAR WHAT: the tests FILE names, each given `lib` and ARG = $VAR.
real_tests() {
  local file=$1 arg=$2 var=$3 what=$4 t name lib expr out tests
  mapfile -t tests < <(nix_raw "builtins.concatStringsSep \"\\n\" (import $(nstr "$file") { names = true; })")
  for t in "${tests[@]}"; do
    name=modules/$t
    wants "$name" || continue
    if [ -z "${NIXPKGS_LIB:-}" ] || [ -z "${!var:-}" ]; then
      skip "$name" "needs NIXPKGS_LIB and $var ($what)"
      continue
    fi
    lib=$NIXPKGS_LIB
    [ -e "$lib/lib/default.nix" ] && lib=$lib/lib
    expr="(import $(nstr "$file") { lib = import $(nstr "$lib"); $arg = $(nstr "${!var}"); }).\"$t\""
    if out=$(nix_json "$expr" 2>&1); then
      if [ "$out" = true ]; then ok "$name"; else failed "$name" "$(nix_raw "$expr" 2>&1)"; fi
    else
      failed "$name" "$out"
    fi
  done
}
# microvm.nix's real modules: MICROVM_NIX is a checkout of microvm-nix/microvm.nix.
real_tests "$ROOT/nix/tests/microvm-real.nix" microvm MICROVM_NIX \
  "checkouts of nixpkgs.lib and microvm.nix"
# nixpkgs' real build-vm.nix and qemu-vm.nix: NIXPKGS is a directory holding them at their
# nixpkgs paths (a nixpkgs checkout, or the files alone).
real_tests "$ROOT/nix/tests/vm-real.nix" nixpkgs NIXPKGS \
  "nixpkgs.lib, and nixpkgs' nixos/modules/virtualisation/{build-vm,qemu-vm}.nix"

echo "nix: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
