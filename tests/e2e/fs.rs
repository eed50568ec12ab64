//! virtio-fs with the upstream virtiofsd, and the Nix-store-like tree both fs suites share.
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

pub(crate) const FS_NAMES: [&str; 6] = [
    "fs_store_checksums_match",
    "fs_symlinks_resolve",
    "fs_executables_run",
    "fs_two_shares",
    "fs_unmount_and_remount",
    "fs_backend_killed_vm_survives",
];

/// A virtiofsd serving `dir` on `socket`, killed when dropped.
pub(crate) struct Virtiofsd(pub(crate) std::process::Child);

impl Virtiofsd {
    pub(crate) fn start(bin: &Path, dir: &Path, socket: &Path) -> Result<Virtiofsd, String> {
        let child = crate::virtiofsd::spawn(bin, dir, socket)
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(Virtiofsd(child))
    }
}

impl Virtiofsd {
    /// nixvm's own back end, `nixvm storefs`, in virtiofsd's place.
    /// Its log (at level info) goes to `log`.
    pub(crate) fn start_storefs(
        dir: &Path,
        socket: &Path,
        log: &Path,
    ) -> Result<Virtiofsd, String> {
        let _ = std::fs::remove_file(socket);
        let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(NIXVM)
            .arg("storefs")
            .arg("--socket")
            .arg(socket)
            .arg("--path")
            .arg(dir)
            .env("NIXVM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("nixvm storefs: {e}"))?;
        Ok(Virtiofsd(child))
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        wait_timeout(&mut self.0, Duration::ZERO);
    }
}

pub(crate) const H_HELLO: &str = "0c6kzph7l0dcbqmjfgfql7ay8mhf2dsj-hello-2.12";
pub(crate) const H_LINKS: &str = "1b9p07z77phvv2hf6gm9f28syp39f99i-links";
pub(crate) const H_BUSYBOX: &str = "2r4q8k1hn7x1gsd7kmhv0jq5d4c1bfsz-busybox-1.36";
pub(crate) const H_BIG: &str = "3x5lv0nw7dj5b0gq0m5h4k7ka9a7rwxf-big";

/// A tree laid out like a Nix store: store paths with nested directories and 2 000 small
/// files, relative and absolute symlinks, an executable, one 32 MiB file.
pub(crate) fn make_store(dir: &Path, busybox: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let _ = std::fs::remove_dir_all(dir);
    for p in 0..100 {
        for d in 0..2 {
            let sub = dir.join(format!("{p:032}-pkg-{p}/share/d{d}"));
            std::fs::create_dir_all(&sub)?;
            for f in 0..10 {
                std::fs::write(
                    sub.join(format!("f{f}")),
                    format!("pkg {p} dir {d} file {f}\n"),
                )?;
            }
        }
    }
    let hello = dir.join(H_HELLO);
    for sub in ["bin", "libexec", "share"] {
        std::fs::create_dir_all(hello.join(sub))?;
    }
    std::fs::write(hello.join("libexec/hello-real"), "hello-from-store\n")?;
    symlink("../libexec/hello-real", hello.join("bin/hello"))?;
    std::fs::write(hello.join("share/msg"), "remount-ok\n")?;
    let links = dir.join(H_LINKS);
    std::fs::create_dir_all(&links)?;
    symlink(format!("/nix/store/{H_HELLO}/libexec"), links.join("lib"))?;
    let bb = dir.join(H_BUSYBOX).join("bin");
    std::fs::create_dir_all(&bb)?;
    std::fs::copy(busybox, bb.join("busybox"))?;
    std::fs::set_permissions(bb.join("busybox"), std::fs::Permissions::from_mode(0o555))?;
    let big = dir.join(H_BIG);
    std::fs::create_dir_all(&big)?;
    let mut f = std::fs::File::create(big.join("data.bin"))?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..32 {
        for c in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// sha256 over `sha256sum` of every regular file under `dir`, sorted by path, as the guest
/// computes it.
pub(crate) fn tree_sha256(dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1")
        .current_dir(dir)
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One boot with two virtio-fs shares: a Nix-store-like tree (tag ro-store, mounted at
/// /nix/.ro-store as NixOS does) and a small one (tag data). The guest checks the store,
/// unmounts and remounts it; then the test kills the data share's virtiofsd and the guest
/// sees errors there and powers off normally. Returns the results in FS_NAMES order.
pub(crate) fn fs_boot(g: &Guest, virtiofsd: &Path) -> Result<Vec<TestResult>, String> {
    let tmp = temp_dir();
    let (store, data) = (tmp.join("store"), tmp.join("data"));
    make_store(&store, &assets().join("busybox")).map_err(|e| format!("store tree: {e}"))?;
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    std::fs::write(data.join("marker"), "second-share\n").map_err(|e| e.to_string())?;
    let host_sha = tree_sha256(&store);
    let (s1, s2) = (tmp.join("ro-store.sock"), tmp.join("data.sock"));
    let _store_d = Virtiofsd::start(virtiofsd, &store, &s1)?;
    let mut data_d = Virtiofsd::start(virtiofsd, &data, &s2)?;
    let script = script_disk(
        "fs-script.img",
        &format!(
            r#"
mkdir -p /nix/.ro-store /mnt/data
mount -t virtiofs ro-store /nix/.ro-store && echo "NIXVM-TEST: mounted=ro-store"
ln -s /nix/.ro-store /nix/store
mount -t virtiofs data /mnt/data && echo "NIXVM-TEST: mounted=data"
cd /nix/.ro-store
echo "NIXVM-TEST: store=$(find . -type f | wc -l),$(find . -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
cd /
echo "NIXVM-TEST: links=$(readlink /nix/store/{H_HELLO}/bin/hello),$(cat /nix/store/{H_HELLO}/bin/hello),$(cat /nix/store/{H_LINKS}/lib/hello-real)"
bb=/nix/store/{H_BUSYBOX}/bin/busybox
if [ -x $bb ] && [ ! -x /nix/store/{H_HELLO}/share/msg ]; then x=modes-ok; else x=modes-wrong; fi
echo "NIXVM-TEST: exec=$x,$($bb echo static-ok)"
echo "NIXVM-TEST: data=$(cat /mnt/data/marker)"
umount /nix/.ro-store
if [ -e /nix/.ro-store/{H_HELLO} ]; then u=still-there; else u=gone; fi
mount -t virtiofs ro-store /nix/.ro-store
echo "NIXVM-TEST: remount=$u,$(cat /nix/.ro-store/{H_HELLO}/share/msg)"
echo "NIXVM-TEST: kill-data-backend"
i=0
while [ ! -e /nix/.ro-store/backend-killed ] && [ $i -lt 240 ]; do sleep 0.5; i=$((i + 1)); done
if cat /mnt/data/marker >/dev/null 2>&1; then r=still-readable; else r=fails; fi
echo "NIXVM-TEST: after_kill=$r"
"#
        ),
    );
    let cl = cmdline("script");
    let d = format!("path={},readonly=on", script.display());
    let (f1, f2) = (
        format!("tag=ro-store,socket={}", s1.display()),
        format!("tag=data,socket={}", s2.display()),
    );
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend(["--memory", "512M", "--fs", &f1, "--fs", &f2, "--disk", &d]);
    let mut cmd = Command::new(NIXVM);
    cmd.args(&args).stdin(Stdio::null());
    let mut vm = Streaming::spawn_command(cmd)?;
    // Checksumming 2 000 files and 32 MiB through nested KVM takes a minute or more.
    vm.wait_for_within("NIXVM-TEST: kill-data-backend", Duration::from_secs(900))?;
    data_d.0.kill().map_err(|e| e.to_string())?;
    let _ = data_d.0.wait();
    std::fs::write(store.join("backend-killed"), "").map_err(|e| e.to_string())?;
    vm.wait_for("NIXVM-TEST: after_kill=")?;
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;

    let is = |key: &str, want: &str| vm.expect(key, want);
    let sums = is("mounted", "ro-store").and(is("store", &format!("2004,{host_sha}")));
    let links = is(
        "links",
        "../libexec/hello-real,hello-from-store,hello-from-store",
    );
    let exec = is("exec", "modes-ok,static-ok");
    let data_mounted = || {
        vm.seen
            .contains("NIXVM-TEST: mounted=data")
            .then_some(())
            .ok_or_else(|| format!("the data share did not mount\nconsole:\n{}", vm.seen))
    };
    let two = data_mounted().and(is("data", "second-share"));
    let remount = is("remount", "gone,remount-ok");
    let killed = data_mounted()
        .and(is("after_kill", "fails"))
        .and_then(|()| {
            check!(
                status.and_then(|s| s.code()) == Some(0),
                "nixvm after its backend died: {status:?}"
            );
            Ok(())
        });
    let _ = std::fs::remove_dir_all(&store);
    Ok(vec![sums, links, exec, two, remount, killed])
}
