//! Frames a guest sends on a `--net local` interface: the gateway's answer (DHCP, ARP, ping)
//! must come without a panic, and never be larger than a DHCP reply or the frame itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixvm_devices::virtio::net::local;

fuzz_target!(|data: &[u8]| {
    if let Some(reply) = local::answer(data) {
        assert!(reply.len() <= data.len().max(14 + 20 + 8 + 300));
    }
});
