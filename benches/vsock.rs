//! vsock benchmark: a stream of MIB MiB guest → host and host → guest through nixvm's
//! virtio-vsock (its host side UNIX sockets), beside Cloud Hypervisor's (the same UNIX-socket
//! protocol; `CLOUD_HYPERVISOR=/path/to/cloud-hypervisor`) and QEMU microvm's vhost-vsock
//! (the host kernel's AF_VSOCK; only where /dev/vhost-vsock is usable), same guest, same run.
//!
//! `cargo bench -p nixvm --bench vsock`. NIXVM_BENCH_RUNS (default 3) rounds, the VMMs in
//! turn. The guest (busybox initramfs plus `resources/vsock-io.c`, static) sends MIB MiB from
//! its tmpfs to host port 6000, timed in the guest; then it listens on port 7000 and the host
//! sends MIB MiB there, timed on the host from its connect to the guest's close.
//! Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;

use common::{Result, Route, git_commit, output, stats};

const MIB: usize = 64;
const CID: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a transfer may go without progress.
const STALL: Duration = Duration::from_secs(120);
const SCRIPT: &str = r#"
head -c BYTES /dev/urandom > /tmp/up
now() { cut -d' ' -f1 /proc/uptime; }
t0=$(now)
/bin/vsock-io connect 2 6000 < /tmp/up > /dev/null 2> /tmp/err || echo "NIXVM-BENCH: error=up: $(cat /tmp/err)"
t1=$(now)
rm /tmp/up
echo "NIXVM-BENCH: up_mbs=$(awk -v s="$t1" -v t="$t0" 'BEGIN { printf "%.3f", MIB * 1048576 / (s - t) / 1e6 }')"
/bin/vsock-io listen 7000 < /dev/null > /tmp/down 2> /tmp/err2 || echo "NIXVM-BENCH: error=down: $(cat /tmp/err2)" &
sleep 1
echo "NIXVM-BENCH: listening"
wait
echo "NIXVM-BENCH: down_bytes=$(wc -c < /tmp/down)"
echo "NIXVM-BENCH: done"
"#;

/// How the host reaches the guest's vsock.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostSide {
    /// A UNIX socket PATH (CONNECT <port>), and PATH_<port> for the guest's connections.
    Unix,
    /// The host kernel's AF_VSOCK (vhost-vsock), through the vsock-io tool.
    Kernel,
}

struct Vmm {
    name: &'static str,
    command: Command,
    host: HostSide,
}

struct Files {
    initrd: PathBuf,
    script: PathBuf,
    tool: PathBuf,
    dir: PathBuf,
    /// MIB MiB for the host to send.
    data: PathBuf,
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("vsock bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<()> {
    let root = common::root();
    let dir = root.join("target/vsock-bench");
    let files = Files {
        initrd: dir.join("initramfs.cpio.gz"),
        script: dir.join("script.img"),
        tool: dir.join("vsock-io"),
        dir: dir.clone(),
        data: dir.join("data"),
    };
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_none() {
        prepare(&root, &files)?;
    }
    match common::route()? {
        Route::Here => measure(&root, &files),
        Route::Skipped(why) => {
            println!("skipped: {why}");
            Ok(())
        }
        Route::RanInL1(code) => std::process::exit(code),
    }
}

/// The static vsock-io, the initramfs with it as /bin/vsock-io, the script disk and the data
/// the host sends (host side: L1 sees this tree read-only).
fn prepare(root: &Path, f: &Files) -> Result<()> {
    let assets = common::build_assets()?;
    std::fs::create_dir_all(&f.dir)?;
    let mut cc = Command::new("cc");
    cc.args(["-static", "-O2", "-o"]).arg(&f.tool);
    output(cc.arg(root.join("resources/vsock-io.c")))?;
    common::initrd_with(&assets, &f.tool, "vsock-io", &f.dir, &f.initrd)?;
    let script = SCRIPT
        .replace("BYTES", &(MIB << 20).to_string())
        .replace("MIB", &MIB.to_string());
    common::script_disk(&f.script, &script)?;
    let data: Vec<u8> = (0..MIB << 20)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 251).unwrap_or(0))
        .collect();
    std::fs::write(&f.data, data)?;
    Ok(())
}

fn measure(root: &Path, f: &Files) -> Result<()> {
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(3), |n| n.parse())?;
    let commit = git_commit(root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let assets = root.join("target/e2e-assets");
    let kernel = assets.join("vmlinux");
    // Sockets in L1's own /tmp (the host's tree is read-only there).
    let tmp = std::env::temp_dir().join(format!("nixvm-vsock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let sock = tmp.join("v.sock");
    let cmdline = "console=ttyS0 quiet nixvm.action=script";
    let script_ro = format!("path={},readonly=on", f.script.display());
    let mut vmms = Vec::new();
    let mut nixvm = Command::new(env!("CARGO_BIN_EXE_nixvm"));
    nixvm
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&f.initrd);
    nixvm.args(["--cmdline", cmdline, "--cpus", "1", "--memory", "256M"]);
    nixvm.args(["--serial", "stdio", "--rng", "off", "--disk", &script_ro]);
    nixvm.args(["--vsock", &format!("cid={CID},socket={}", sock.display())]);
    vmms.push(Vmm {
        name: "nixvm",
        command: nixvm,
        host: HostSide::Unix,
    });
    if Path::new("/dev/vhost-vsock").exists() {
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args("-M microvm,rtc=on -accel kvm -cpu host -m 256 -smp 1 -nodefaults".split(' '));
        qemu.args("-no-reboot -display none -serial stdio -monitor none".split(' '));
        qemu.arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&f.initrd);
        qemu.args(["-append", cmdline, "-drive"]);
        qemu.arg(format!(
            "file={},if=none,id=s,format=raw,readonly=on",
            f.script.display()
        ));
        qemu.args(["-device", "virtio-blk-device,drive=s", "-device"]);
        qemu.arg(format!("vhost-vsock-device,guest-cid={CID}"));
        vmms.push(Vmm {
            name: "QEMU microvm (vhost-vsock)",
            command: qemu,
            host: HostSide::Kernel,
        });
    } else {
        eprintln!("vsock bench: no /dev/vhost-vsock here: no QEMU column");
    }
    if let Some(mut ch) = common::cloud_hypervisor(
        "vsock",
        Command::new,
        &kernel,
        &f.initrd,
        cmdline,
        (1, "size=256M"),
    ) {
        ch.arg("--disk")
            .arg(common::ch_disk(&f.script, ",readonly=on"));
        ch.args(["--vsock", &format!("cid={CID},socket={}", sock.display())]);
        vmms.push(Vmm {
            name: "Cloud Hypervisor",
            command: ch,
            host: HostSide::Unix,
        });
    }
    let mut results = vec![[Vec::new(), Vec::new()]; vmms.len()];
    let mut failed = 0;
    for round in 1..=runs {
        for (v, vmm) in vmms.iter_mut().enumerate() {
            let _ = std::fs::remove_file(&sock);
            match round_of(vmm, f, &sock) {
                Ok([up, down]) => {
                    eprintln!(
                        "round {round} {}: up {up:.1} MB/s, down {down:.1} MB/s",
                        vmm.name
                    );
                    results[v][0].push(up);
                    results[v][1].push(down);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("round {round} {}: FAILED: {e}", vmm.name);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    common::header(commit.as_deref())?;
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    println!(
        "- guest: Debian {} vmlinux (PVH), busybox initramfs + vsock-io, 1 vCPU, 256 MiB; \
         {MIB} MiB each way, one stream",
        kver.trim()
    );
    println!("- {runs} rounds, the VMMs in turn\n");
    let names: Vec<&str> = vmms.iter().map(|v| v.name).collect();
    println!(
        "| median (min–max) | {} | nixvm / best other |",
        names.join(" | ")
    );
    println!("|---|{}---|", "---|".repeat(names.len()));
    for (row, name) in ["guest → host", "host → guest"].iter().enumerate() {
        let cells: Vec<_> = results.iter().map(|r| stats(r[row].clone())).collect();
        let shown: Vec<String> = cells
            .iter()
            .map(|c| match c {
                Some((m, lo, hi)) => format!("{m:.1} MB/s ({lo:.1}–{hi:.1})"),
                None => "–".into(),
            })
            .collect();
        let best = cells[1..].iter().flatten().map(|c| c.0).reduce(f64::max);
        let ratio = match (cells[0], best) {
            (Some((ours, ..)), Some(b)) => format!("**{:.2}**", ours / b),
            _ => String::new(),
        };
        println!("| {name} | {} | {ratio} |", shown.join(" | "));
    }
    if failed > 0 {
        return Err(format!("{failed} rounds failed").into());
    }
    Ok(())
}

/// One boot: guest → host MB/s (timed in the guest) and host → guest MB/s (timed here).
fn round_of(vmm: &mut Vmm, f: &Files, sock: &Path) -> Result<[f64; 2]> {
    // The guest's connection to host port 6000: read to its end.
    let sink = match vmm.host {
        HostSide::Unix => {
            let l = UnixListener::bind(format!("{}_6000", sock.display()))?;
            Sink::Unix(thread::spawn(move || -> usize {
                let Ok((mut s, _)) = l.accept() else { return 0 };
                // A VMM that stalls fails the round instead of hanging the bench.
                let _ = s.set_read_timeout(Some(STALL));
                let mut n = 0;
                let mut b = vec![0u8; 1 << 16];
                while let Ok(k) = s.read(&mut b) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                n
            }))
        }
        HostSide::Kernel => {
            let mut c = Command::new(&f.tool)
                .args(["listen", "6000"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut out = c.stdout.take().ok_or("no stdout")?;
            let count = thread::spawn(move || -> usize {
                let mut n = 0;
                let mut b = vec![0u8; 1 << 16];
                while let Ok(k) = out.read(&mut b) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                n
            });
            Sink::Kernel(c, count)
        }
    };
    let mut child = vmm
        .command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (tx, lines) = mpsc::channel();
    let out = child.stdout.take().ok_or("no stdout")?;
    thread::spawn(move || {
        for l in BufReader::new(out)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<[f64; 2]> {
        let start = Instant::now();
        let wait_for = |key: &str| -> Result<String> {
            loop {
                let left = TIMEOUT.checked_sub(start.elapsed()).ok_or("timed out")?;
                let l = lines
                    .recv_timeout(left)
                    .map_err(|_| format!("no `{key}` line"))?;
                if let Some(e) = l.split("NIXVM-BENCH: error=").nth(1) {
                    return Err(format!("in the guest: {e}").into());
                }
                if let Some(v) = l.split(&format!("NIXVM-BENCH: {key}")).nth(1) {
                    return Ok(v.trim_start_matches('=').trim().to_owned());
                }
            }
        };
        let up: f64 = wait_for("up_mbs")?.parse()?;
        wait_for("listening")?;
        let t = Instant::now();
        match vmm.host {
            HostSide::Unix => {
                let mut c = connect_retry(sock)?;
                c.set_read_timeout(Some(STALL))?;
                c.set_write_timeout(Some(STALL))?;
                c.write_all(b"CONNECT 7000\n")?;
                let mut ok = String::new();
                BufReader::new(&c).read_line(&mut ok)?;
                if !ok.starts_with("OK ") {
                    return Err(format!("CONNECT 7000: {ok:?}").into());
                }
                c.write_all(&std::fs::read(&f.data)?)
                    .map_err(|e| format!("host → guest: sending: {e}"))?;
                c.shutdown(std::net::Shutdown::Write)?;
                c.read_to_end(&mut Vec::new())
                    .map_err(|e| format!("host → guest: no end from the guest: {e}"))?;
            }
            HostSide::Kernel => {
                let st = Command::new(&f.tool)
                    .args(["connect", &CID.to_string(), "7000"])
                    .stdin(std::fs::File::open(&f.data)?)
                    .stdout(Stdio::null())
                    .status()?;
                if !st.success() {
                    return Err(format!("vsock-io connect: {st}").into());
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let got: usize = wait_for("down_bytes")?.parse()?;
        if got != MIB << 20 {
            return Err(format!("the guest got {got} bytes of {}", MIB << 20).into());
        }
        wait_for("done")?;
        Ok([up, (MIB << 20) as f64 / secs / 1e6])
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let got = match sink {
        Sink::Unix(t) => {
            // Unblocks the sink's accept if the guest never connected.
            let _ = UnixStream::connect(format!("{}_6000", sock.display()));
            t.join().unwrap_or(0)
        }
        Sink::Kernel(mut c, count) => {
            let _ = c.kill();
            let _ = c.wait();
            count.join().unwrap_or(0)
        }
    };
    let _ = std::fs::remove_file(format!("{}_6000", sock.display()));
    let r = result?;
    if !status.success() {
        return Err(format!("{}: {status}", vmm.name).into());
    }
    if got != MIB << 20 {
        return Err(format!("the host got {got} bytes of {}", MIB << 20).into());
    }
    Ok(r)
}

enum Sink {
    Unix(thread::JoinHandle<usize>),
    Kernel(std::process::Child, thread::JoinHandle<usize>),
}

/// Connects to the VMM's vsock socket (it exists once the VMM runs).
fn connect_retry(sock: &Path) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e.into()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}
