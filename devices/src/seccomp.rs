//! Seccomp as nixvm and storefs use it: allow-lists kept as data ([`Allow`]), compiled to
//! one BPF program per kind of thread, and a SIGSYS handler that names the call a filter
//! refused and stops the process (the kernel's "Bad system call" says nothing about where).
//!
//! Filters stack: a thread keeps the filter of the thread that started it and may only add
//! to it, so a list for a thread must include what the threads it starts need.
//! nixvm's lists are in `vmm/src/seccomp.rs`; storefs' in `storefs/src/sandbox.rs`.
//! Device threads are started here, in this crate, and take the filter given to
//! [`set_worker_filter`] as they start ([`enter_worker`]).
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// What a filter does with a call that is not on its lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Stop the process, naming the call (SIGSYS, reported by [`report_violations`]).
    On,
    /// Let the call through; the kernel logs it (audit, or dmesg without auditd).
    Log,
    /// No filter at all.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("'{s}' is not one of on, log, off")),
        }
    }
}

/// One condition on a call's argument `index`: `arg & mask == value` (32-bit compare unless
/// `wide`).
#[derive(Clone, Copy, Debug)]
pub struct Arg {
    pub index: u8,
    pub mask: u64,
    pub value: u64,
    pub wide: bool,
}

/// Argument `index` equals `value` (compared as 32 bits: ioctl requests, flags, commands).
pub const fn eq(index: u8, value: u64) -> Arg {
    Arg {
        index,
        mask: u32::MAX as u64,
        value,
        wide: false,
    }
}

/// The bits `mask` of argument `index` are `value` (e.g. no PROT_EXEC: mask PROT_EXEC, 0).
pub const fn masked(index: u8, mask: u64, value: u64) -> Arg {
    Arg {
        index,
        mask,
        value,
        wide: true,
    }
}

/// One allowed form of a system call: all of `when` hold. A call may have several forms.
#[derive(Clone, Copy, Debug)]
pub struct Allow {
    pub call: libc::c_long,
    pub when: &'static [Arg],
}

/// The call, with any arguments.
pub const fn any(call: libc::c_long) -> Allow {
    Allow { call, when: &[] }
}

/// The call when all of `when` hold.
pub const fn when(call: libc::c_long, when: &'static [Arg]) -> Allow {
    Allow { call, when }
}

const NO_EXEC: &[Arg] = &[masked(2, libc::PROT_EXEC as u64, 0)];
const fn fcntl_cmd(cmd: libc::c_int) -> [Arg; 1] {
    // fcntl commands are small non-negative ints.
    [eq(1, cmd as u64)]
}
const F_GETFD: [Arg; 1] = fcntl_cmd(libc::F_GETFD);
const F_SETFD: [Arg; 1] = fcntl_cmd(libc::F_SETFD);
const F_GETFL: [Arg; 1] = fcntl_cmd(libc::F_GETFL);
const F_SETFL: [Arg; 1] = fcntl_cmd(libc::F_SETFL);
const F_DUPFD_CLOEXEC: [Arg; 1] = fcntl_cmd(libc::F_DUPFD_CLOEXEC);

/// openat for reading only (argument 2: flags): no write access, no creating, no truncating.
pub const READ_ONLY_OPEN: &[Arg] = &[masked(
    2,
    (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64,
    libc::O_RDONLY as u64,
)];
/// clone for threads only (argument 0: flags), never a new process.
pub const THREADS_ONLY: &[Arg] = &[masked(
    0,
    libc::CLONE_THREAD as u64,
    libc::CLONE_THREAD as u64,
)];

/// What any thread of a Rust program calls once it runs, in nixvm and storefs alike: reading
/// and writing descriptors it has, the allocator (memory never executable), futexes, time,
/// randomness, a thread's start (naming itself) and end, signal masks and returns, a
/// panic's abort.
pub const RUNTIME: &[Allow] = &[
    any(libc::SYS_read),
    any(libc::SYS_write),
    any(libc::SYS_writev),
    any(libc::SYS_close),
    when(libc::SYS_fcntl, &F_GETFD),
    when(libc::SYS_fcntl, &F_SETFD),
    when(libc::SYS_fcntl, &F_GETFL),
    when(libc::SYS_fcntl, &F_SETFL),
    when(libc::SYS_fcntl, &F_DUPFD_CLOEXEC),
    when(libc::SYS_mmap, NO_EXEC),
    when(libc::SYS_mprotect, NO_EXEC),
    any(libc::SYS_munmap),
    any(libc::SYS_mremap),
    any(libc::SYS_madvise),
    any(libc::SYS_brk),
    any(libc::SYS_futex),
    any(libc::SYS_clock_gettime),
    any(libc::SYS_clock_nanosleep),
    any(libc::SYS_nanosleep),
    any(libc::SYS_sched_yield),
    any(libc::SYS_sched_getaffinity),
    any(libc::SYS_getrandom),
    any(libc::SYS_gettid),
    any(libc::SYS_getpid),
    any(libc::SYS_rt_sigprocmask),
    any(libc::SYS_rt_sigreturn),
    any(libc::SYS_sigaltstack),
    any(libc::SYS_rseq),
    any(libc::SYS_set_robust_list),
    any(libc::SYS_restart_syscall),
    // A new thread names itself, still under its parent's filter.
    when(libc::SYS_prctl, &[eq(0, libc::PR_SET_NAME as u64)]),
    any(libc::SYS_exit),
    any(libc::SYS_exit_group),
    // abort() on a panic: the process signals itself.
    any(libc::SYS_tgkill),
];

/// What the SIGSYS report itself calls: every filter allows it.
const REPORT: &[Allow] = &[
    any(libc::SYS_write),
    when(libc::SYS_prctl, &[eq(0, libc::PR_GET_NAME as u64)]),
    any(libc::SYS_exit_group),
];

/// Compiles the union of `lists` (and what the report needs) for `mode`; None for
/// [`Mode::Off`].
pub fn program(lists: &[&[Allow]], mode: Mode) -> Result<Option<BpfProgram>, Error> {
    let all: Vec<&[Allow]> = lists.iter().copied().chain([REPORT]).collect();
    match mode {
        Mode::Off => Ok(None),
        Mode::On => compile(&all, SeccompAction::Trap).map(Some),
        Mode::Log => compile(&all, SeccompAction::Log).map(Some),
    }
}

fn compile(lists: &[&[Allow]], mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for a in lists.iter().flat_map(|l| l.iter()) {
        let entry = rules.entry(a.call).or_insert_with(|| Some(Vec::new()));
        if a.when.is_empty() {
            // Any arguments: no rule narrows it (an empty rule list matches every call).
            *entry = None;
            continue;
        }
        let Some(forms) = entry else { continue };
        let conditions = a
            .when
            .iter()
            .map(|c| {
                let len = if c.wide {
                    SeccompCmpArgLen::Qword
                } else {
                    SeccompCmpArgLen::Dword
                };
                SeccompCondition::new(c.index, len, SeccompCmpOp::MaskedEq(c.mask), c.value)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Build)?;
        forms.push(SeccompRule::new(conditions).map_err(Error::Build)?);
    }
    let rules = rules
        .into_iter()
        .map(|(call, forms)| (call, forms.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(Error::Build)?;
    BpfProgram::try_from(filter).map_err(Error::Build)
}

/// Installs `program` on the calling thread (and the threads it starts from now on).
pub fn apply(program: Option<&BpfProgram>) -> Result<(), Error> {
    match program {
        Some(p) => seccompiler::apply_filter(p).map_err(Error::Apply),
        None => Ok(()),
    }
}

/// Installs `program` on every thread of the process (TSYNC).
pub fn apply_all_threads(program: Option<&BpfProgram>) -> Result<(), Error> {
    match program {
        Some(p) => seccompiler::apply_filter_all_threads(p).map_err(Error::Apply),
        None => Ok(()),
    }
}

/// The union of `lists` with misses failing with EPERM: for tests, which must see a refusal
/// without the process stopping.
pub fn compile_errno(lists: &[&[Allow]]) -> Result<BpfProgram, Error> {
    compile(lists, SeccompAction::Errno(libc::EPERM.unsigned_abs()))
}

static WORKER_FILTER: OnceLock<Option<BpfProgram>> = OnceLock::new();

/// The filter device threads install as they start (once per process; later calls are
/// ignored).
pub fn set_worker_filter(program: Option<BpfProgram>) {
    let _ = WORKER_FILTER.set(program);
}

/// Called first thing by every device thread: installs the worker filter, if one was set.
/// A thread that cannot install it must not serve the guest unfiltered: Err, and it ends.
pub fn enter_worker() -> Result<(), Error> {
    match WORKER_FILTER.get() {
        Some(p) => apply(p.as_ref()),
        None => Ok(()),
    }
}

/// Stops the process when a filter refuses a call, after writing which call and which
/// thread to stderr. Process-wide; call once, before installing filters in [`Mode::On`].
pub fn report_violations(program_name: &'static str) -> Result<(), Error> {
    let _ = PROGRAM.set(program_name);
    // SAFETY: a zeroed sigaction is valid; we set the handler and flags, and sigaction only
    // reads the struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

static PROGRAM: OnceLock<&'static str> = OnceLock::new();

/// Exit status after a refused call: the process failed.
const VIOLATION_STATUS: i32 = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: formatting into a stack buffer, prctl, write, _exit.
    // For SIGSYS, siginfo's union holds { void *call_addr; int syscall; unsigned arch; }
    // after the three ints si_signo, si_errno, si_code and padding: the call number is the
    // int at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO), which is 128 bytes.
    let call = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let name_len = thread.iter().position(|&b| b == 0).unwrap_or(16);
    let mut msg = [0u8; 256];
    let mut w = Cursor {
        buf: &mut msg,
        at: 0,
    };
    w.put(PROGRAM.get().copied().unwrap_or("nixvm").as_bytes());
    w.put(b": seccomp: thread '");
    w.put(&thread[..name_len]);
    w.put(b"' made system call ");
    w.number(call);
    w.put(b", which its filter does not allow; stopping (--seccomp log lets such calls through)\n");
    let len = w.at;
    // SAFETY: write from a valid buffer of `len` bytes, then _exit: both async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(VIOLATION_STATUS);
    }
}

/// A bounded writer for the signal handler (no allocation).
struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.at);
        self.buf[self.at..self.at + n].copy_from_slice(&s[..n]);
        self.at += n;
    }

    fn number(&mut self, n: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = i64::from(n).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.put(b"-");
        }
        self.put(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &[Allow] = &[
        any(libc::SYS_getpid),
        when(libc::SYS_fcntl, &[eq(1, libc::F_GETFD as u64)]),
        when(libc::SYS_mmap, &[masked(2, libc::PROT_EXEC as u64, 0)]),
    ];

    /// What a thread under LIST (misses failing with EPERM instead of SIGSYS) gets from
    /// each call. Its own thread: the test process stays unfiltered.
    fn calls_under_list() -> Vec<i64> {
        let p = compile_errno(&[LIST, &[any(libc::SYS_exit), any(libc::SYS_futex)]]).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&p).unwrap();
            // SAFETY: raw calls with valid arguments; mmap of one anonymous page, unmapped
            // by the process at exit.
            unsafe {
                let mmap = |prot: libc::c_int| {
                    let r = libc::syscall(
                        libc::SYS_mmap,
                        0,
                        4096,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if r == -1 { -1 } else { 0 }
                };
                vec![
                    libc::syscall(libc::SYS_getpid).signum(),
                    libc::syscall(libc::SYS_fcntl, 0, libc::F_GETFD),
                    libc::syscall(libc::SYS_fcntl, 0, libc::F_GETFL),
                    mmap(libc::PROT_READ),
                    mmap(libc::PROT_READ | libc::PROT_EXEC),
                    libc::syscall(libc::SYS_getuid),
                ]
            }
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_filter_allows_the_listed_forms_only() {
        assert!(program(&[LIST], Mode::Off).unwrap().is_none());
        assert!(program(&[LIST], Mode::On).unwrap().is_some());
        let got = calls_under_list();
        // getpid; fcntl F_GETFD yes, F_GETFL no; mmap without PROT_EXEC yes, with no; getuid no.
        assert_eq!(got[0], 1);
        assert!(got[1] >= 0);
        assert_eq!(got[2], -1);
        assert_eq!(got[3], 0);
        assert_eq!(got[4], -1);
        assert_eq!(got[5], -1);
    }

    #[test]
    fn a_refused_call_stops_the_process_naming_it() {
        // In a child process (the stop is the whole process's): compiled before the fork,
        // so that the child only installs, calls and reports.
        let p = program(
            &[LIST, &[any(libc::SYS_write), any(libc::SYS_exit_group)]],
            Mode::On,
        )
        .unwrap()
        .unwrap();
        report_violations("nixvm-test").unwrap();
        let mut pipe = [0; 2];
        // SAFETY: pipe fills the two-int array; fork's child only makes system calls
        // (dup2, prctl/seccomp through apply_filter, getuid) and never returns.
        unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::dup2(pipe[1], 2);
                if seccompiler::apply_filter(&p).is_ok() {
                    libc::syscall(libc::SYS_getuid);
                }
                libc::_exit(99);
            }
            libc::close(pipe[1]);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            let mut out = vec![0u8; 512];
            let n = libc::read(pipe[0], out.as_mut_ptr().cast(), out.len());
            libc::close(pipe[0]);
            out.truncate(usize::try_from(n).unwrap_or(0));
            let text = String::from_utf8_lossy(&out);
            assert!(libc::WIFEXITED(status), "{status}: {text}");
            assert_eq!(libc::WEXITSTATUS(status), VIOLATION_STATUS, "{text}");
            assert!(
                text.starts_with("nixvm-test: seccomp: thread '")
                    && text.contains(&format!("made system call {}", libc::SYS_getuid)),
                "{text}"
            );
        }
    }

    #[test]
    fn log_mode_lets_a_call_outside_the_lists_through() {
        let p = program(&[LIST, RUNTIME], Mode::Log).unwrap().unwrap();
        let uid = std::thread::spawn(move || {
            seccompiler::apply_filter(&p).unwrap();
            // SAFETY: getuid takes no arguments.
            unsafe { libc::syscall(libc::SYS_getuid) }
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        assert_eq!(uid, unsafe { libc::syscall(libc::SYS_getuid) });
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert!("kill".parse::<Mode>().is_err());
    }

    #[test]
    fn the_report_names_thread_and_call() {
        let mut b = [0u8; 64];
        let mut w = Cursor { buf: &mut b, at: 0 };
        w.put(b"call ");
        w.number(-17);
        w.put(b" ");
        w.number(0);
        w.put(b" ");
        w.number(i32::MAX);
        let at = w.at;
        assert_eq!(&b[..at], b"call -17 0 2147483647");
    }
}
