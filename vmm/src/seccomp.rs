//! nixvm's seccomp allow-lists, one place, as data (the mechanism is
//! `nixvm_devices::seccomp`). Derived from what the threads call while the e2e suite runs
//! (strace -f over the suite), then checked by running the whole suite with the filters on.
//!
//! Three kinds of thread, and since a thread keeps the filter of the one that started it,
//! each list builds on the one below:
//! - device threads (`WORKER`): their queues' eventfds, the disk image, the TAP, vsock's
//!   UNIX sockets;
//! - vCPU threads (+ `VCPU`): KVM_RUN, and what the devices do inline on an MMIO write:
//!   activation starts device threads and connects to vhost-user back ends;
//! - the main thread (+ `VMM`): the event loop, the control socket, the console, signals,
//!   rebooting in place (the KVM state set again), teardown. It starts the vCPU threads.
//!
//! Filters go on once the VM is built: opening images, TAPs, KVM and starting storefs come
//! before and need no rules here.
use kvm_bindings::{
    KVMIO, kvm_cpuid2, kvm_fpu, kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use nixvm_devices::seccomp::{
    Allow, Arg, Mode, READ_ONLY_OPEN, RUNTIME, THREADS_ONLY, any, eq, when,
};
use nixvm_devices::virtio::net;
use seccompiler::BpfProgram;
use std::mem::size_of;

pub use nixvm_devices::seccomp::Error;

const fn kvm(dir: u32, nr: u32, size: usize) -> u64 {
    // The sizes are those of small fixed structs (at most a few KiB).
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    vmm_sys_util::ioctl::ioctl_expr(dir, KVMIO, nr, size)
}
const NONE: u32 = 0;
const W: u32 = 1;
const R: u32 = 2;
/// Argument 1 equals the value: an ioctl's request, an fcntl's command.
macro_rules! arg1 {
    ($($name:ident = $value:expr;)*) => {
        $(const $name: &[Arg] = &[eq(1, $value)];)*
    };
}
arg1! {
    KVM_RUN = kvm(NONE, 0x80, 0);
    KVM_GET_REGS = kvm(R, 0x81, size_of::<kvm_regs>());
    KVM_SET_REGS = kvm(W, 0x82, size_of::<kvm_regs>());
    KVM_GET_SREGS = kvm(R, 0x83, size_of::<kvm_sregs>());
    KVM_SET_SREGS = kvm(W, 0x84, size_of::<kvm_sregs>());
    KVM_SET_MSRS = kvm(W, 0x89, size_of::<kvm_msrs>());
    KVM_SET_FPU = kvm(W, 0x8d, size_of::<kvm_fpu>());
    KVM_GET_LAPIC = kvm(R, 0x8e, size_of::<kvm_lapic_state>());
    KVM_SET_LAPIC = kvm(W, 0x8f, size_of::<kvm_lapic_state>());
    KVM_SET_CPUID2 = kvm(W, 0x90, size_of::<kvm_cpuid2>());
    KVM_SET_MP_STATE = kvm(W, 0x99, size_of::<kvm_mp_state>());
    KVM_SET_VCPU_EVENTS = kvm(W, 0xa0, size_of::<kvm_vcpu_events>());
    KVM_SET_XCRS = kvm(W, 0xa7, size_of::<kvm_xcrs>());
    KVM_SET_IRQCHIP = kvm(R, 0x63, size_of::<kvm_irqchip>());
    KVM_SET_PIT2 = kvm(W, 0xa0, size_of::<kvm_pit_state2>());
    KVM_IRQFD = kvm(W, 0x76, size_of::<kvm_irqfd>());
    KVM_SET_GSI_ROUTING = kvm(W, 0x6a, size_of::<kvm_irq_routing>());
    TCGETS = libc::TCGETS;
    TCSETS = libc::TCSETS;
    TIOCGWINSZ = libc::TIOCGWINSZ;
    FIONBIO = libc::FIONBIO;
    TUNSETOFFLOAD = net::TUNSETOFFLOAD;
    TUNSETVNETHDRSZ = net::TUNSETVNETHDRSZ;
}

/// Every thread, beside the runtime's calls (`nixvm_devices::seccomp::RUNTIME`): eventfds,
/// polling, reading files, tightening its own filter.
const COMMON: &[Allow] = &[
    any(libc::SYS_poll),
    any(libc::SYS_ppoll),
    any(libc::SYS_eventfd2),
    // Reading files: the runtime's CPU count (/sys), the kernel and initrd on a reboot.
    when(libc::SYS_openat, READ_ONLY_OPEN),
    any(libc::SYS_fstat),
    any(libc::SYS_newfstatat),
    any(libc::SYS_statx),
    when(libc::SYS_prctl, &[eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)]),
    when(
        libc::SYS_seccomp,
        &[eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)],
    ),
];

/// Device threads: block requests on the image, frames on the TAP.
const WORKER: &[Allow] = &[
    any(libc::SYS_readv),
    any(libc::SYS_pread64),
    any(libc::SYS_preadv),
    any(libc::SYS_preadv2),
    any(libc::SYS_pwrite64),
    any(libc::SYS_pwritev),
    any(libc::SYS_pwritev2),
    any(libc::SYS_fdatasync),
    any(libc::SYS_fsync),
    any(libc::SYS_fallocate),
    any(libc::SYS_lseek),
    any(libc::SYS_recvmsg),
    any(libc::SYS_sendmsg),
    // The vhost-user deadline cuts off a back end that stopped answering; vsock half-closes.
    any(libc::SYS_shutdown),
    // vsock: its connections in an epoll set, host clients accepted, host sockets
    // connected, sd_notify datagrams sent.
    any(libc::SYS_epoll_create1),
    any(libc::SYS_epoll_ctl),
    any(libc::SYS_epoll_wait),
    any(libc::SYS_epoll_pwait),
    any(libc::SYS_accept4),
    when(libc::SYS_socket, &[eq(0, libc::AF_UNIX as u64)]),
    any(libc::SYS_connect),
    any(libc::SYS_sendto),
    any(libc::SYS_recvfrom),
    when(libc::SYS_ioctl, FIONBIO),
    // virtio-blk's reads and writes on io_uring: submitted, and waited for at a reset.
    any(libc::SYS_io_uring_enter),
];

/// vCPU threads: KVM_RUN (and reading their registers); device activation (threads,
/// vhost-user connections, TAP offloads, io_uring).
const VCPU: &[Allow] = &[
    when(libc::SYS_ioctl, KVM_RUN),
    // Where a triple fault left the vCPU, for the warning that reports it.
    when(libc::SYS_ioctl, KVM_GET_REGS),
    when(libc::SYS_ioctl, KVM_GET_SREGS),
    when(libc::SYS_ioctl, TUNSETOFFLOAD),
    when(libc::SYS_ioctl, TUNSETVNETHDRSZ),
    any(libc::SYS_clone3),
    when(libc::SYS_clone, THREADS_ONLY),
    // A disk's io_uring and its completion eventfd, made where the disk is activated.
    any(libc::SYS_io_uring_setup),
    any(libc::SYS_io_uring_register),
    // UNIX sockets for vhost-user connections: in WORKER, which vCPU threads have too.
    // A PCI function's MSI-X vectors, routed and bound as the driver enables and masks them.
    when(libc::SYS_ioctl, KVM_IRQFD),
    when(libc::SYS_ioctl, KVM_SET_GSI_ROUTING),
];

/// The main thread: event loop, control socket, console, signals, reboot in place, teardown.
const VMM: &[Allow] = &[
    // (epoll, accept4, shutdown and FIONBIO are in WORKER, which the main thread has too.)
    // The power button's deadline (--shutdown-timeout).
    any(libc::SYS_timerfd_create),
    any(libc::SYS_timerfd_settime),
    any(libc::SYS_timerfd_gettime),
    any(libc::SYS_setsockopt),
    any(libc::SYS_getsockopt),
    any(libc::SYS_unlink),
    any(libc::SYS_unlinkat),
    any(libc::SYS_rt_sigaction),
    any(libc::SYS_kill),
    any(libc::SYS_wait4),
    any(libc::SYS_waitid),
    when(libc::SYS_ioctl, TCGETS),
    when(libc::SYS_ioctl, TCSETS),
    when(libc::SYS_ioctl, TIOCGWINSZ),
    when(libc::SYS_ioctl, KVM_SET_REGS),
    when(libc::SYS_ioctl, KVM_GET_SREGS),
    when(libc::SYS_ioctl, KVM_SET_SREGS),
    when(libc::SYS_ioctl, KVM_SET_MSRS),
    when(libc::SYS_ioctl, KVM_SET_FPU),
    when(libc::SYS_ioctl, KVM_GET_LAPIC),
    when(libc::SYS_ioctl, KVM_SET_LAPIC),
    when(libc::SYS_ioctl, KVM_SET_CPUID2),
    when(libc::SYS_ioctl, KVM_SET_MP_STATE),
    when(libc::SYS_ioctl, KVM_SET_VCPU_EVENTS),
    when(libc::SYS_ioctl, KVM_SET_XCRS),
    when(libc::SYS_ioctl, KVM_SET_IRQCHIP),
    when(libc::SYS_ioctl, KVM_SET_PIT2),
    // A machine reset masks every MSI-X vector.
    when(libc::SYS_ioctl, KVM_IRQFD),
    when(libc::SYS_ioctl, KVM_SET_GSI_ROUTING),
];

/// The compiled filters of one nixvm process.
pub struct Filters {
    pub vcpu: Option<BpfProgram>,
    pub vmm: Option<BpfProgram>,
}

impl Filters {
    /// Compiles the three filters for `mode` and hands device threads theirs; in
    /// [`Mode::On`] a refused call stops nixvm with a line naming it.
    pub fn new(mode: Mode) -> Result<Filters, Error> {
        use nixvm_devices::seccomp::{program, report_violations, set_worker_filter};
        if mode == Mode::On {
            report_violations("nixvm")?;
        }
        set_worker_filter(program(&[RUNTIME, COMMON, WORKER], mode)?);
        Ok(Filters {
            vcpu: program(&[RUNTIME, COMMON, WORKER, VCPU], mode)?,
            vmm: program(&[RUNTIME, COMMON, WORKER, VCPU, VMM], mode)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_in_every_mode() {
        // Not Filters::new: that sets this test process's device-thread filter.
        use nixvm_devices::seccomp::program;
        for mode in [Mode::On, Mode::Log] {
            assert!(
                program(&[COMMON, WORKER, VCPU, VMM], mode)
                    .unwrap()
                    .is_some()
            );
        }
        assert!(program(&[COMMON], Mode::Off).unwrap().is_none());
    }

    #[test]
    fn kvm_requests_match_the_kernel_headers() {
        // Known values from linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN[0].value, 0xae80);
        assert_eq!(KVM_SET_REGS[0].value, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS[0].value, 0x8138_ae83);
        assert_eq!(KVM_SET_CPUID2[0].value, 0x4008_ae90);
        assert_eq!(KVM_SET_MSRS[0].value, 0x4008_ae89);
        assert_eq!(KVM_SET_IRQCHIP[0].value, 0x8208_ae63);
        assert_eq!(KVM_SET_PIT2[0].value, 0x4070_aea0);
        assert_eq!(KVM_SET_LAPIC[0].value, 0x4400_ae8f);
    }
}
