use super::*;
use std::io::Write;

#[test]
fn sizes() {
    assert_eq!("512M".parse(), Ok(Size(512 << 20)));
    assert_eq!("2G".parse(), Ok(Size(2 << 30)));
    assert_eq!("2g".parse(), Ok(Size(2 << 30)));
    assert_eq!("384".parse(), Ok(Size(384 << 20)));
    assert_eq!("65536K".parse(), Ok(Size(64 << 20)));
    for bad in ["", "M", "12X", "-1", "1.5G", "99999999999999T", " "] {
        assert!(bad.parse::<Size>().is_err(), "{bad:?}");
    }
    assert_eq!(Size(512 << 20).to_string(), "512M");
    assert_eq!(Size(2 << 30).to_string(), "2G");
    assert_eq!(Size(1536 << 20).to_string(), "1536M");
    assert_eq!(Size((23 << 30) + (512 << 20) + 1).to_string(), "23.5G");
}

#[test]
fn console_specs() {
    assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
    assert_eq!("off".parse(), Ok(ConsoleConfig::Off));
    assert_eq!(
        "file=/tmp/x".parse(),
        Ok(ConsoleConfig::File("/tmp/x".into()))
    );
    assert_eq!(
        "socket=a/b.sock".parse(),
        Ok(ConsoleConfig::Socket("a/b.sock".into()))
    );
    assert_eq!(
        "connect=/run/x.sock".parse(),
        Ok(ConsoleConfig::Connect("/run/x.sock".into()))
    );
    for bad in ["", "file=", "socket", "connect=", "tcp=1", "Stdio"] {
        assert!(bad.parse::<ConsoleConfig>().is_err(), "{bad:?}");
    }
    for s in ["stdio", "off", "file=/x", "socket=/y", "connect=/z"] {
        assert_eq!(s.parse::<ConsoleConfig>().unwrap().to_string(), s);
    }
}

#[test]
fn fs_and_memory_specs() {
    let f: FsConfig = "tag=ro-store,socket=/run/s.sock".parse().unwrap();
    assert_eq!(
        f,
        FsConfig {
            tag: "ro-store".into(),
            socket: Some("/run/s.sock".into()),
            path: None,
            readonly: false,
            queue_size: 1024,
            queues: None,
        }
    );
    assert_eq!(f.request_queues(8), 1);
    let f: FsConfig = "socket=s,tag=t,queue_size=128".parse().unwrap();
    assert_eq!(f.queue_size, 128);
    let f: FsConfig = "tag=store,path=/nix/store,readonly=on,queues=2"
        .parse()
        .unwrap();
    assert_eq!(
        (f.path.as_deref(), f.readonly, f.queues, f.socket),
        (Some(Path::new("/nix/store")), true, Some(2), None)
    );
    let f: FsConfig = "tag=store,path=/nix/store,readonly=on".parse().unwrap();
    assert_eq!((f.request_queues(1), f.request_queues(2)), (1, 2));
    // Switches read the same in every option (key_values + parse_switch).
    let yes: FsConfig = "tag=store,path=/nix/store,readonly=yes".parse().unwrap();
    assert_eq!(yes, f);
    assert_eq!(f.request_queues(64), 4);
    for bad in [
        "",
        "socket=s",
        "tag=,socket=s",
        "tag=t,socket=s,queue_size=x",
        "tag=t,socket=s,cache=auto",
        "tag=t,path=/d,readonly=maybe",
        "tag=t,socket=s,tag=u",
        "tag=t,path=",
        "tag=t,socket=s,queues=-1",
    ] {
        assert!(bad.parse::<FsConfig>().is_err(), "{bad:?}");
    }
    let j: FsConfig = serde_json::from_str(r#"{"tag":"t","socket":"/s"}"#).unwrap();
    assert_eq!(j.queue_size, 1024);
    assert_eq!(
        "2G,shared=on".parse(),
        Ok(MemoryArg {
            size: Size(2 << 30),
            shared: Some(true)
        })
    );
    assert_eq!(
        "512M".parse(),
        Ok(MemoryArg {
            size: Size(512 << 20),
            shared: None
        })
    );
    for bad in ["", "shared=on", "1G,shared=maybe", "1G,huge=on"] {
        assert!(bad.parse::<MemoryArg>().is_err(), "{bad:?}");
    }
}

#[test]
fn net_specs() {
    let n: NetConfig = "tap=tap0,mac=52:54:00:AB:cd:ef".parse().unwrap();
    assert_eq!(n.tap.as_deref(), Some("tap0"));
    assert_eq!(n.mac, Some(Mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef])));
    assert_eq!(n.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
    assert_eq!("fd=3".parse::<NetConfig>().unwrap().fd, Some(3));
    for bad in [
        "",
        "tap=",
        "fd=x",
        "tap=a,fd=3",
        "tap=a,tap=b",
        "mac=52:54:00:00:00:01",
        "tap=a,mac=52:54:00:00:00",
        "tap=a,mac=52:54:00:00:00:01:02",
        "tap=a,mac=5:54:00:00:00:01",
        "tap=a,queues=2",
        "tap",
        "socket=",
        "passt,tap=t",
        "socket=/s,passt",
        "vde=",
        "vde=/v,tap=t",
        "vde=/v,forward=22",
        "tap=t,forward=22",
        "passt,forward=",
        "passt,forward=0",
        "passt,forward=65536",
        "passt,forward=22:",
        "passt,forward=sctp:22",
        "passt,forward=nothost/22",
        "passt,forward=22+x",
        "local=x",
        "local,tap=t",
        "local,forward=22",
    ] {
        assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
    }
    let p: NetConfig = "passt".parse().unwrap();
    assert_eq!(p.passt.as_deref(), Some(Path::new("passt")));
    let p: NetConfig = "passt=/nix/store/x/bin/passt,forward=2222:22+udp:5353+::1/8080:80"
        .parse()
        .unwrap();
    assert_eq!(
        p.passt.as_deref(),
        Some(Path::new("/nix/store/x/bin/passt"))
    );
    let specs: Vec<String> = p.forward.iter().map(ToString::to_string).collect();
    assert_eq!(specs, ["2222:22", "udp:5353:5353", "::1/8080:80"]);
    assert!(check_net(&p).is_ok());
    assert_eq!(
        serde_json::to_string(&p).unwrap(),
        r#"{"passt":"/nix/store/x/bin/passt","forward":["2222:22","udp:5353:5353","::1/8080:80"]}"#
    );
    let s: NetConfig = "socket=/run/passt.sock,mac=02:00:00:00:00:02"
        .parse()
        .unwrap();
    assert_eq!(s.socket.as_deref(), Some(Path::new("/run/passt.sock")));
    let v: NetConfig = "vde=/tmp/vde1.ctl,mac=52:54:00:12:01:01".parse().unwrap();
    assert_eq!(v.vde.as_deref(), Some(Path::new("/tmp/vde1.ctl")));
    assert!(check_net(&v).is_ok());
    assert_eq!(
        serde_json::to_string(&v).unwrap(),
        r#"{"vde":"/tmp/vde1.ctl","mac":"52:54:00:12:01:01"}"#
    );
    let l: NetConfig = "local,mac=52:54:00:12:34:56".parse().unwrap();
    assert!(l.local && check_net(&l).is_ok());
    assert_eq!(
        serde_json::to_string(&l).unwrap(),
        r#"{"local":true,"mac":"52:54:00:12:34:56"}"#
    );
    let twice: NetConfig =
        serde_json::from_str(r#"{"passt":"passt","forward":["22","22:23"]}"#).unwrap();
    assert!(matches!(check_net(&twice), Err(Error::DuplicateForward(_))));
    let stray: NetConfig = serde_json::from_str(r#"{"tap":"t","forward":["22"]}"#).unwrap();
    assert!(matches!(check_net(&stray), Err(Error::ForwardWithoutPasst)));
    assert!(serde_json::from_str::<NetConfig>(r#"{"passt":"passt","forward":["x"]}"#).is_err());
    let j: NetConfig = serde_json::from_str(r#"{"tap":"t","mac":"02:00:00:00:00:01"}"#).unwrap();
    assert_eq!(j.mac, Some(Mac([2, 0, 0, 0, 0, 1])));
    assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t","mac":"zz"}"#).is_err());
    assert_eq!(
        serde_json::to_string(&j).unwrap(),
        r#"{"tap":"t","mac":"02:00:00:00:00:01"}"#
    );
    assert!(check_net(&j).is_ok());
    let named = |t: &str| NetConfig {
        tap: Some(t.into()),
        ..Default::default()
    };
    assert!(matches!(
        check_net(&named("a-very-long-name0")),
        Err(Error::TapName(_))
    ));
    assert!(matches!(check_net(&named("a/b")), Err(Error::TapName(_))));
    assert!(matches!(
        check_net(&NetConfig {
            fd: Some(-1),
            ..Default::default()
        }),
        Err(Error::NetFd(-1))
    ));
    assert!(matches!(
        check_net(&NetConfig::default()),
        Err(Error::NetKind)
    ));
    assert!(matches!(
        check_net(&NetConfig {
            mac: Some(Mac([1, 0, 0, 0, 0, 0])),
            ..named("t")
        }),
        Err(Error::MulticastMac(_))
    ));
}

#[test]
fn disk_specs() {
    let d: DiskConfig = "path=/a.img,readonly=on,serial=abc,direct=on"
        .parse()
        .unwrap();
    assert_eq!(
        d,
        DiskConfig {
            path: "/a.img".into(),
            readonly: true,
            serial: Some("abc".into()),
            direct: true
        }
    );
    assert!(!"path=b.img".parse::<DiskConfig>().unwrap().readonly);
    for bad in [
        "",
        "/a.img",
        "path=",
        "path=/a,readonly=maybe",
        "path=/a,cache=none",
        "readonly=on",
    ] {
        assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?}");
    }
    let j: DiskConfig = serde_json::from_str(r#"{"path":"/x","readonly":true}"#).unwrap();
    assert!(j.readonly && j.serial.is_none());
    assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/x","ro":true}"#).is_err());
}

#[test]
fn key_values_is_the_one_option_parser() {
    assert_eq!(
        key_values("a=1,b=,c=x=y"),
        Some(vec![("a", "1"), ("b", ""), ("c", "x=y")])
    );
    // A bare key is one with an empty value (for `--net passt`); a value-less flag is
    // still refused by options whose values need something (`readonly`).
    assert_eq!(key_values("a,b=1"), Some(vec![("a", ""), ("b", "1")]));
    assert!("path=/a,readonly".parse::<DiskConfig>().is_err());
    for bad in ["", "a=1,", "=1", "a=1,a=2", "a,a"] {
        assert_eq!(key_values(bad), None, "{bad:?}");
    }
    assert!("path=/a,path=/b".parse::<DiskConfig>().is_err());
    assert!(
        "tap=a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02"
            .parse::<NetConfig>()
            .is_err()
    );
    assert!("1G,shared=on,shared=off".parse::<MemoryArg>().is_err());
}

#[test]
fn config_file_parses_and_rejects_unknown_fields() {
    let f: Settings = serde_json::from_str(
        r#"{"kernel":"/k","memory":"1G","cpus":2,"serial":"socket=/s","cmdline":"a b"}"#,
    )
    .unwrap();
    assert_eq!(f.memory.map(|m| m.size), Some(Size(1 << 30)));
    assert_eq!(f.serial, Some(ConsoleConfig::Socket("/s".into())));
    let f: Settings = serde_json::from_str(r#"{"memory":384}"#).unwrap();
    assert_eq!(f.memory.map(|m| m.size), Some(Size(384 << 20)));
    assert!(serde_json::from_str::<Settings>(r#"{"kernal":"/k"}"#).is_err());
    assert!(serde_json::from_str::<Settings>(r#"{"memory":"lots"}"#).is_err());
    assert!(serde_json::from_str::<Settings>(r#"{"serial":"tcp"}"#).is_err());
}

#[test]
fn flags_override_the_file() {
    let file = Settings {
        kernel: Some("/a".into()),
        cpus: Some(2),
        ..Default::default()
    };
    let flags = Settings {
        cpus: Some(4),
        memory: Some("1G,shared=on".parse().unwrap()),
        ..Default::default()
    };
    let m = file.merge(flags);
    assert_eq!(
        (m.kernel, m.cpus, m.memory),
        (
            Some("/a".into()),
            Some(4),
            Some(MemoryArg {
                size: Size(1 << 30),
                shared: Some(true)
            })
        )
    );
}

/// A minimal bzImage, in a file of its own (tests run in parallel).
fn fake_bzimage() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("nixvm-cfg-{}-{n}-bz", std::process::id()));
    let mut b = vec![0u8; 0x1000];
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    File::create(&path).unwrap().write_all(&b).unwrap();
    path
}

#[test]
fn validation() {
    let k = fake_bzimage();
    let base = || Settings {
        kernel: Some(k.clone()),
        ..Default::default()
    };
    let v = VmConfig::validate(base(), 1 << 40).unwrap();
    assert_eq!(
        (v.cpus, v.memory, v.serial.clone(), v.kernel_format.as_str()),
        (1, DEFAULT_MEMORY, ConsoleConfig::Stdio, "bzImage")
    );
    assert_eq!(v.cmdline, DEFAULT_CMDLINE);
    assert_eq!(v.console, ConsoleConfig::Off);
    let with = |f: fn(&mut Settings)| {
        let mut c = base();
        f(&mut c);
        VmConfig::validate(c, 1 << 40)
    };
    // The console on stdio takes the serial port's place there unless it is given.
    let v = with(|c| c.console = Some(ConsoleConfig::Stdio)).unwrap();
    assert_eq!(
        (v.serial, v.console),
        (ConsoleConfig::Off, ConsoleConfig::Stdio)
    );
    assert!(matches!(with(|c| c.cpus = Some(0)), Err(Error::NoCpus)));
    // virtio-mmio unless asked; virtio-pci needs the ACPI tables that describe its bus.
    assert_eq!(v.transport, Transport::Mmio);
    let pci = with(|c| c.transport = Some(Transport::Pci)).unwrap();
    assert_eq!(pci.transport, Transport::Pci);
    assert!(matches!(
        with(|c| {
            c.transport = Some(Transport::Pci);
            c.cmdline = Some("console=ttyS0 acpi=off".into());
        }),
        Err(Error::PciWithoutAcpi)
    ));
    assert!(matches!(
        with(|c| c.shutdown_timeout = Some(1 << 63)),
        Err(Error::ShutdownTimeout(_))
    ));
    assert!(with(|c| c.shutdown_timeout = Some(MAX_SHUTDOWN_TIMEOUT)).is_ok());
    assert!(matches!(
        with(|c| c.nets = Some(vec!["fd=3".parse().unwrap(), "fd=3".parse().unwrap()])),
        Err(Error::DuplicateNetFd(3))
    ));
    // Memory is private unless asked for or a vhost-user device needs it shared.
    assert!(!v.shared_memory);
    assert!(
        with(|c| c.shared_memory = Some(true))
            .unwrap()
            .shared_memory
    );
    let share = |tag: &str, q: u16| FsConfig {
        tag: tag.into(),
        socket: Some("/s".into()),
        path: None,
        readonly: false,
        queue_size: q,
        queues: None,
    };
    let dir = |spec: &str| {
        let mut f: FsConfig = spec.parse().unwrap();
        f.path = f.path.map(|_| std::env::temp_dir());
        f
    };
    let mut c = base();
    c.fs = Some(vec![share("ro-store", 1024)]);
    assert!(VmConfig::validate(c, 1 << 40).unwrap().shared_memory);
    let mut c = base();
    c.fs = Some(vec![dir("tag=a,path=/d,readonly=on")]);
    assert!(VmConfig::validate(c, 1 << 40).unwrap().shared_memory);
    let mut c = base();
    let mut missing = dir("tag=a,path=/d,readonly=on");
    missing.path = Some("/nonexistent/nixvm-share".into());
    c.fs = Some(vec![missing]);
    assert!(matches!(
        VmConfig::validate(c, 1 << 40),
        Err(Error::FsDir(p)) if p == Path::new("/nonexistent/nixvm-share")
    ));
    for (shares, want) in [
        (vec![share("", 8)], "tag"),
        (vec![share(&"x".repeat(37), 1024)], "tag"),
        (vec![share("a", 100)], "queue"),
        (vec![share("a", 8)], "queue"),
        (vec![share("a", 1024), share("a", 1024)], "dup"),
        (vec![dir("tag=a")], "source"),
        (vec![dir("tag=a,socket=/s,path=/d,readonly=on")], "source"),
        (vec![dir("tag=a,path=/d")], "not-ro"),
        (vec![dir("tag=a,socket=/s,readonly=on")], "ro-socket"),
        (vec![dir("tag=a,path=/d,readonly=on,queues=0")], "queues"),
        (vec![dir("tag=a,path=/d,readonly=on,queues=17")], "queues"),
        (vec![dir("tag=a,socket=/s,queues=17")], "queues"),
    ] {
        let mut c = base();
        c.fs = Some(shares);
        let e = VmConfig::validate(c, 1 << 40).unwrap_err();
        let ok = match want {
            "tag" => matches!(e, Error::FsTag(_)),
            "queue" => matches!(e, Error::FsQueueSize(_)),
            "source" => matches!(e, Error::FsSource(_)),
            "not-ro" => matches!(e, Error::FsNotReadOnly(_)),
            "ro-socket" => matches!(e, Error::FsReadOnlySocket(_)),
            "queues" => matches!(e, Error::FsQueues(_)),
            _ => matches!(e, Error::FsDuplicateTag(_)),
        };
        assert!(ok, "{e}");
    }
    assert!(matches!(
        with(|c| c.cpus = Some(255)),
        Err(Error::TooManyCpus(255))
    ));
    assert!(matches!(
        with(|c| c.memory = Some(Size(63 << 20).into())),
        Err(Error::MemoryTooSmall(_))
    ));
    assert!(matches!(
        with(|c| c.memory = Some(Size(2 << 40).into())),
        Err(Error::MemoryTooLarge { .. })
    ));
    assert!(matches!(with(|c| c.kernel = None), Err(Error::NoKernel)));
    assert!(matches!(
        with(|c| c.kernel = Some("/nonexistent/k".into())),
        Err(Error::Kernel(kernel::Error::Read { .. }))
    ));
    assert!(matches!(
        with(|c| c.kernel = Some("/etc/hostname".into())),
        Err(Error::Kernel(kernel::Error::UnknownFormat { .. }))
    ));
    assert!(matches!(
        with(|c| c.initrd = Some("/nonexistent/i".into())),
        Err(Error::Initrd { .. })
    ));
    assert!(matches!(
        with(|c| c.serial = Some(ConsoleConfig::Socket("/nonexistent/dir/s".into()))),
        Err(Error::ConsoleDir { .. })
    ));
    assert!(matches!(
        with(|c| c.console = Some(ConsoleConfig::File("/nonexistent/dir/f".into()))),
        Err(Error::ConsoleDir {
            which: "console",
            ..
        })
    ));
    assert!(matches!(
        with(|c| {
            c.console = Some(ConsoleConfig::Stdio);
            c.serial = Some(ConsoleConfig::Stdio);
        }),
        Err(Error::TwoStdioConsoles)
    ));
    assert!(matches!(
        with(|c| c.cmdline = Some("x".repeat(4000))),
        Err(Error::Cmdline(_))
    ));
    // An initrd bigger than memory.
    let big = std::env::temp_dir().join(format!("nixvm-cfg-{}-big", std::process::id()));
    File::create(&big).unwrap().set_len(100 << 20).unwrap();
    let mut c = base();
    c.initrd = Some(big.clone());
    c.memory = Some(Size(64 << 20).into());
    assert!(matches!(
        VmConfig::validate(c, 1 << 40),
        Err(Error::InitrdTooLarge { .. })
    ));
    assert!(host_memory() > 64 << 20);
    // Disks: whole sectors, present, serial of at most 20 bytes.
    let disk = |p: &Path| DiskConfig {
        path: p.to_owned(),
        ..Default::default()
    };
    let odd = std::env::temp_dir().join(format!("nixvm-cfg-{}-odd", std::process::id()));
    File::create(&odd).unwrap().set_len(1000).unwrap();
    let with_disk = |d: DiskConfig| {
        let mut c = base();
        c.disks = Some(vec![d]);
        VmConfig::validate(c, 1 << 40)
    };
    assert!(matches!(
        with_disk(disk(&odd)),
        Err(Error::Disk(block::Error::Size { size: 1000, .. }))
    ));
    assert!(matches!(
        with_disk(disk(Path::new("/nonexistent/disk.img"))),
        Err(Error::Disk(block::Error::Open { .. }))
    ));
    let long_serial = DiskConfig {
        serial: Some("x".repeat(21)),
        ..disk(&k)
    };
    assert!(matches!(with_disk(long_serial), Err(Error::DiskSerial(_))));
    std::fs::File::create(&odd).unwrap().set_len(4096).unwrap();
    let v = with_disk(disk(&odd)).unwrap();
    assert_eq!((v.disks.len(), v.rng), (1, true));
}

#[test]
fn seccomp_mode_from_flag_and_file() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        s: Settings,
    }
    let f = Flags::try_parse_from(["nixvm", "--seccomp", "log"]).unwrap();
    assert_eq!(f.s.seccomp, Some(Mode::Log));
    assert!(Flags::try_parse_from(["nixvm", "--seccomp", "kill"]).is_err());
    let file: Settings = serde_json::from_str(r#"{"seccomp": "off"}"#).unwrap();
    assert_eq!(file.seccomp, Some(Mode::Off));
    let f = Flags::try_parse_from(["nixvm", "--transport", "pci"]).unwrap();
    assert_eq!(f.s.transport, Some(Transport::Pci));
    let file: Settings = serde_json::from_str(r#"{"transport": "pci"}"#).unwrap();
    assert_eq!(file.transport, Some(Transport::Pci));
    assert!(serde_json::from_str::<Settings>(r#"{"seccomp": "maybe"}"#).is_err());
}

#[test]
fn smbios_uuid_oem_strings_and_credentials() {
    let k = fake_bzimage();
    let secret = std::env::temp_dir().join(format!("nixvm-cfg-{}-cred", std::process::id()));
    std::fs::write(&secret, b"\x00\xffkey\n").unwrap();
    let file_cred = format!("tls.key=@{}", secret.display());
    let v = VmConfig::validate(
        Settings {
            kernel: Some(k.clone()),
            uuid: Some("4C4C4544-0000-1000-8000-00000000ABCD".into()),
            oem_strings: Some(vec!["hello".into()]),
            credentials: Some(vec!["a=b=c".into(), file_cred, "empty=".into()]),
            ..Default::default()
        },
        1 << 40,
    )
    .unwrap();
    assert_eq!(
        v.uuid.as_deref(),
        Some("4c4c4544-0000-1000-8000-00000000abcd")
    );
    assert_eq!(
        v.oem_strings,
        [
            "hello",
            "io.systemd.credential.binary:a=Yj1j",
            "io.systemd.credential.binary:tls.key=AP9rZXkK",
            "io.systemd.credential.binary:empty=",
        ]
    );
    let s = v.smbios();
    // SMBIOS order: the first three fields little-endian.
    assert_eq!(s.uuid[..4], [0x44, 0x45, 0x4c, 0x4c]);
    assert_eq!(s.uuid[15], 0xcd);
    // The strings are not printed, only counted.
    let shown = serde_json::to_value(&v).unwrap();
    assert_eq!(shown["oem_strings"], 4);
    assert_eq!(
        VmConfig::validate(
            Settings {
                kernel: Some(k.clone()),
                ..Default::default()
            },
            1 << 40
        )
        .unwrap()
        .smbios()
        .uuid,
        [0; 16]
    );
    let with = |f: &dyn Fn(&mut Settings)| {
        let mut c = Settings {
            kernel: Some(k.clone()),
            ..Default::default()
        };
        f(&mut c);
        VmConfig::validate(c, 1 << 40)
    };
    for bad in ["", "1234", "4c4c4544-0000-1000-8000-00000000abcdx"] {
        assert!(
            matches!(with(&|c| c.uuid = Some(bad.into())), Err(Error::Uuid(_))),
            "{bad:?}"
        );
    }
    for bad in ["", "a\0b"] {
        assert!(matches!(
            with(&|c| c.oem_strings = Some(vec![bad.into()])),
            Err(Error::OemString(_))
        ));
    }
    for bad in ["novalue", "=v", "a/b=v", ".=v", "..=v"] {
        assert!(
            matches!(
                with(&|c| c.credentials = Some(vec![bad.into()])),
                Err(Error::Credential(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        with(&|c| c.credentials = Some(vec!["x=@/nonexistent/file".into()])),
        Err(Error::CredentialFile { .. })
    ));
    let big = format!("big={}", "x".repeat(60_000));
    assert!(matches!(
        with(&|c| c.credentials = Some(vec![big.clone()])),
        Err(Error::SmbiosTooLarge(_))
    ));
    std::fs::remove_file(&secret).unwrap();
}

#[test]
fn vsock_spec_and_readiness() {
    assert_eq!(
        "cid=5,socket=/run/v.sock".parse(),
        Ok(VsockConfig {
            cid: 5,
            socket: Some("/run/v.sock".into())
        })
    );
    assert_eq!(
        "cid=3".parse(),
        Ok(VsockConfig {
            cid: 3,
            socket: None
        })
    );
    for bad in ["", "socket=/x", "cid=x", "cid=3,port=1", "cid=3,socket="] {
        assert!(bad.parse::<VsockConfig>().is_err(), "{bad:?}");
    }
    let k = fake_bzimage();
    let with = |f: &dyn Fn(&mut Settings)| {
        let mut c = Settings {
            kernel: Some(k.clone()),
            ..Default::default()
        };
        f(&mut c);
        VmConfig::validate(c, 1 << 40)
    };
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(
            with(&|c| c.vsock = Some(VsockConfig { cid, socket: None })),
            Err(Error::VsockCid(_))
        ));
    }
    assert!(matches!(
        with(&|c| c.vsock = Some("cid=3,socket=/nonexistent/dir/v.sock".parse().unwrap())),
        Err(Error::VsockDir(_))
    ));
    // Readiness alone brings a vsock device with CID 3 and the credential systemd reads.
    let v = with(&|c| c.notify_socket = Some("/run/systemd/notify".into())).unwrap();
    assert_eq!(
        v.vsock,
        Some(VsockConfig {
            cid: 3,
            socket: None
        })
    );
    assert_eq!(
        v.oem_strings,
        ["io.systemd.credential:vmm.notify_socket=vsock-stream:2:4294967280"]
    );
    // An explicit device keeps its CID; an empty NOTIFY_SOCKET means none.
    let v = with(&|c| {
        c.notify_socket = Some("@abstract".into());
        c.vsock = Some("cid=7".parse().unwrap());
    })
    .unwrap();
    assert_eq!(v.vsock.map(|v| v.cid), Some(7));
    let v = with(&|c| c.notify_socket = Some(String::new())).unwrap();
    assert!(v.vsock.is_none() && v.oem_strings.is_empty());
}
