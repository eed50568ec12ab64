//! virtio-fs through nixvm's own back end (`--fs path=`, `nixvm storefs`).
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{fs::*, harness::*};

pub(crate) const STOREFS_NAMES: [&str; 7] = [
    "storefs_checksums_match",
    "storefs_symlinks_and_executables",
    "storefs_writes_fail_erofs",
    "storefs_new_path_appears",
    "storefs_escapes_stay_inside",
    "storefs_path_share_needs_nothing_else",
    "storefs_standalone_daemon",
];

/// One boot with nixvm's own back end serving a small store tree at /nix/.ro-store
/// (`--fs path=`, nixvm starts it) and a second tree through a `nixvm storefs` started by
/// hand (`--fs socket=`). Returns the results in STOREFS_NAMES order.
pub(crate) fn storefs_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let tmp = temp_dir();
    let store = tmp.join("sfs-store");
    let _ = std::fs::remove_dir_all(&store);
    let e = |e: std::io::Error| e.to_string();
    for p in 0..20 {
        let d = store.join(format!("{p:032}-pkg/share"));
        std::fs::create_dir_all(&d).map_err(e)?;
        for f in 0..20 {
            std::fs::write(d.join(format!("f{f}")), format!("{p}/{f}\n")).map_err(e)?;
        }
    }
    let hello = store.join(H_HELLO);
    std::fs::create_dir_all(hello.join("bin")).map_err(e)?;
    std::fs::create_dir_all(hello.join("libexec")).map_err(e)?;
    std::fs::write(hello.join("libexec/hello-real"), "hello-from-store\n").map_err(e)?;
    symlink("../libexec/hello-real", hello.join("bin/hello")).map_err(e)?;
    symlink("/etc/hostname", hello.join("escape")).map_err(e)?;
    let bb = store.join(H_BUSYBOX).join("bin");
    std::fs::create_dir_all(&bb).map_err(e)?;
    std::fs::copy(assets().join("busybox"), bb.join("busybox")).map_err(e)?;
    std::fs::set_permissions(bb.join("busybox"), std::fs::Permissions::from_mode(0o555))
        .map_err(e)?;
    let big: Vec<u8> = (0..16usize << 20)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    std::fs::create_dir_all(store.join(H_BIG)).map_err(e)?;
    std::fs::write(store.join(H_BIG).join("data.bin"), &big).map_err(e)?;
    let host_sha = tree_sha256(&store);
    let side = tmp.join("sfs-side");
    let _ = std::fs::remove_dir_all(&side);
    std::fs::create_dir_all(&side).map_err(e)?;
    std::fs::write(side.join("hello"), "from-the-standalone-daemon\n").map_err(e)?;
    let sock = tmp.join("storefs.sock");
    let daemon_log = tmp.join("sfs-daemon.log");
    let daemon = Virtiofsd::start_storefs(&side, &sock, &daemon_log)?;
    // Where nixvm puts its back end's private socket directory: looked at while it runs.
    let runtime = tmp.join("sfs-runtime");
    let _ = std::fs::remove_dir_all(&runtime);
    std::fs::create_dir_all(&runtime).map_err(e)?;
    let script = script_disk(
        "sfs-script.img",
        &format!(
            r#"
mkdir -p /nix/.ro-store /nix
mount -t virtiofs ro-store /nix/.ro-store && echo "NIXVM-TEST: mounted=ro-store"
mkdir -p /side
mount -t virtiofs side /side -o ro && echo "NIXVM-TEST: side=$(cat /side/hello)"
ln -s /nix/.ro-store /nix/store
cd /nix/.ro-store
echo "NIXVM-TEST: store=$(find . -type f | wc -l),$(find . -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
cd /
echo "NIXVM-TEST: links=$(readlink /nix/store/{H_HELLO}/bin/hello),$(cat /nix/store/{H_HELLO}/bin/hello),$(/nix/store/{H_BUSYBOX}/bin/busybox echo static-ok)"
if touch /nix/.ro-store/newfile 2>/tmp/err; then w=accepted; else w=refused; fi
echo "NIXVM-TEST: write=$w,$(grep -c 'Read-only file system' /tmp/err)"
echo "NIXVM-TEST: escape=$(readlink /nix/.ro-store/{H_HELLO}/escape),$(ls /nix/.ro-store/.. >/dev/null 2>&1 && echo listed)"
echo "NIXVM-TEST: add-a-path"
i=0
while [ ! -e /nix/.ro-store/added-later ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i + 1)); done
echo "NIXVM-TEST: added=$(cat /nix/.ro-store/added-later/msg 2>/dev/null),$(ls /nix/.ro-store | grep -cx added-later)"
"#
        ),
    );
    let cl = cmdline("script");
    let d = format!("path={},readonly=on", script.display());
    let f = format!("tag=ro-store,path={},readonly=on", store.display());
    let f2 = format!("tag=side,socket={}", sock.display());
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend([
        "--memory", "512M", "--cpus", "2", "--fs", &f, "--fs", &f2, "--disk", &d,
    ]);
    let mut cmd = Command::new(NIXVM);
    cmd.args(&args)
        .stdin(Stdio::null())
        .env("XDG_RUNTIME_DIR", &runtime);
    let mut vm = Streaming::spawn_command(cmd)?;
    let nixvm_pid = vm.child.id();
    vm.wait_for_within("NIXVM-TEST: add-a-path", Duration::from_secs(600))?;
    let backends_while_running = storefs_children(nixvm_pid);
    let left_in_runtime = std::fs::read_dir(&runtime).map_err(e)?.count();
    let added = store.join("added-later");
    std::fs::create_dir_all(&added).map_err(e)?;
    std::fs::write(added.join("msg"), "appeared\n").map_err(e)?;
    vm.wait_for("NIXVM-TEST: added=")?;
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;
    let backends_after = storefs_children(nixvm_pid);
    let standalone_exit = {
        let mut d = daemon;
        wait_timeout(&mut d.0, Duration::from_secs(10)).and_then(|s| s.code())
    };
    let is = |key: &str, want: &str| vm.expect(key, want);
    let sums = is("mounted", "ro-store").and(is("store", &format!("403,{host_sha}")));
    let links = is("links", "../libexec/hello-real,hello-from-store,static-ok");
    let erofs = is("write", "refused,1");
    let added = is("added", "appeared,1").and_then(|()| {
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm with storefs: {status:?}"
        );
        Ok(())
    });
    // The symlink is given to the guest as it is (it resolves in the guest's own /etc, not
    // the host's); `..` of the root is the root.
    let escape = is("escape", "/etc/hostname,listed");
    let own = is("mounted", "ro-store").and_then(|()| {
        check!(
            backends_while_running == 1 && backends_after == 0 && left_in_runtime == 0,
            "nixvm's own back end: {backends_while_running} storefs process(es) while the VM \
             ran, {backends_after} after it ended, {left_in_runtime} entries left in the \
             runtime directory (wanted 1, 0, 0)"
        );
        Ok(())
    });
    let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let standalone = is("side", "from-the-standalone-daemon").and_then(|()| {
        check!(
            standalone_exit == Some(0),
            "the standalone nixvm storefs after the VM disconnected: {standalone_exit:?}\n{log}"
        );
        // Landlock and the mount namespace are best effort (the kernel or the host's policy
        // may not allow them); the daemon must say what became of each.
        for what in ["Landlock (", "mount namespace"] {
            let line = log.lines().find(|l| {
                l.contains(what) || (what.starts_with("Landlock") && l.contains("no Landlock"))
            });
            check!(line.is_some(), "no word on the {what} in its log:\n{log}");
            println!("e2e: nixvm storefs: {}", line.unwrap_or_default());
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_dir_all(&side);
    Ok(vec![sums, links, erofs, added, escape, own, standalone])
}

/// How many `nixvm storefs` processes the process `parent` has as children.
pub(crate) fn storefs_children(parent: u32) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .filter_map(|p| p.ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            ppid == Some(parent) && cmd.split(|b| *b == 0).any(|a| a == b"storefs")
        })
        .count()
}
