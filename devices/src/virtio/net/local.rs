//! `--net local`: a link that reaches only nixvm. nixvm plays the gateway of QEMU's user-mode
//! network (10.0.2.0/24) as far as a guest needs it to bring its interface up: it answers
//! DHCP (the guest gets 10.0.2.15/24, router 10.0.2.2), ARP for the gateway and pings to it,
//! and drops every other frame. It is for places where no real user-mode network can run,
//! such as the Nix build sandbox where NixOS tests run (passt finds no network to give
//! there): the guest's first interface comes up at once instead of waiting for a DHCP server
//! that never answers.
//!
//! The gateway runs on its own thread at the far end of a socket pair and speaks the stream
//! protocol ([`super::Stream`]), so the device treats it like passt. It reads one frame at a
//! time (at most [`MAX_FRAME`] bytes, or it stops), answers with at most one frame, and
//! blocks on a full socket, which holds the guest's transmit queue back rather than nixvm.
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::MAX_FRAME;

/// The gateway's addresses, as QEMU's user-mode network has them.
pub const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];
/// The address every guest is offered.
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const NETMASK: [u8; 4] = [255, 255, 255, 0];
const LEASE_SECS: u32 = 86_400;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
/// Where the DHCP options start in a BOOTP message (after the magic cookie).
const BOOTP_OPTIONS: usize = 240;
const DHCP_COOKIE: [u8; 4] = [99, 130, 83, 99];
const DHCPDISCOVER: u8 = 1;
const DHCPOFFER: u8 = 2;
const DHCPREQUEST: u8 = 3;
const DHCPACK: u8 = 5;
const DHCPNAK: u8 = 6;

/// Starts the gateway on a thread of its own; returns the device's end of the socket pair.
/// The thread ends when that end is closed.
pub fn spawn(name: &str) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    std::thread::Builder::new()
        .name(format!("{name}-gateway"))
        .spawn(move || {
            if let Err(e) = serve(theirs) {
                log::debug!("local network gateway stopped: {e}");
            }
        })?;
    Ok(ours)
}

/// Reads frames (a 32-bit big-endian length, then the frame) until the peer closes or sends
/// a length no frame can have; writes the answers the same way.
fn serve(mut sock: UnixStream) -> io::Result<()> {
    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        let mut len = [0u8; 4];
        match sock.read_exact(&mut len) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes is announced (at most {MAX_FRAME})"),
            ));
        }
        sock.read_exact(&mut frame[..len])?;
        if let Some(reply) = answer(&frame[..len]) {
            let n = u32::try_from(reply.len()).expect("a reply is no longer than its request");
            sock.write_all(&n.to_be_bytes())?;
            sock.write_all(&reply)?;
        }
    }
}

/// The gateway's answer to one frame from the guest, if it has one.
pub fn answer(frame: &[u8]) -> Option<Vec<u8>> {
    let eth = frame.get(..ETH_HLEN)?;
    let src: [u8; 6] = eth[6..12].try_into().ok()?;
    let payload = &frame[ETH_HLEN..];
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_ARP => arp(src, payload),
        ETH_P_IP => ipv4(src, payload),
        _ => None,
    }
}

/// An Ethernet frame from the gateway to `dst`.
fn ethernet(dst: [u8; 6], proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A request for the gateway's hardware address gets the reply.
fn arp(src: [u8; 6], p: &[u8]) -> Option<Vec<u8>> {
    let p = p.get(..28)?;
    // Ethernet and IPv4, six- and four-byte addresses, a request, for the gateway.
    if p[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || p[24..28] != GATEWAY_IP {
        return None;
    }
    let mut r = [0u8; 28];
    r[..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    r[7] = 2;
    r[8..14].copy_from_slice(&GATEWAY_MAC);
    r[14..18].copy_from_slice(&GATEWAY_IP);
    r[18..28].copy_from_slice(&p[8..18]);
    Some(ethernet(src, ETH_P_ARP, &r))
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .fold(0u32, u32::wrapping_add);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// An IPv4 header (20 bytes, no options) from the gateway to `dst`, and `payload`.
fn ipv4_packet(proto: u8, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("at most one frame");
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&GATEWAY_IP);
    h[16..20].copy_from_slice(&dst);
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut p = h.to_vec();
    p.extend_from_slice(payload);
    p
}

fn ipv4(src: [u8; 6], p: &[u8]) -> Option<Vec<u8>> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 || p.len() < ihl {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total < ihl || total > p.len() {
        return None;
    }
    // A fragment is no request the gateway answers.
    if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
        return None;
    }
    let (header, body) = (&p[..ihl], &p[ihl..total]);
    let from: [u8; 4] = header[12..16].try_into().ok()?;
    let to: [u8; 4] = header[16..20].try_into().ok()?;
    match header[9] {
        IPPROTO_ICMP if to == GATEWAY_IP => echo(src, from, body),
        IPPROTO_UDP => dhcp(src, body),
        _ => None,
    }
}

/// A ping to the gateway gets its echo reply.
fn echo(src: [u8; 6], from: [u8; 4], icmp: &[u8]) -> Option<Vec<u8>> {
    if icmp.len() < 8 || icmp[0] != 8 || icmp[1] != 0 || checksum(icmp) != 0 {
        return None;
    }
    let mut r = icmp.to_vec();
    r[0] = 0;
    r[2..4].fill(0);
    let sum = checksum(&r);
    r[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(ethernet(
        src,
        ETH_P_IP,
        &ipv4_packet(IPPROTO_ICMP, from, &r),
    ))
}

/// The DHCP option `code`'s value in `options`, if it is there.
fn dhcp_option(options: &[u8], code: u8) -> Option<&[u8]> {
    let mut at = 0;
    // Each step moves on by at least one byte: bounded by the options' length.
    while at < options.len() {
        match options[at] {
            0 => at += 1,
            255 => return None,
            c => {
                let len = usize::from(*options.get(at + 1)?);
                let value = options.get(at + 2..at + 2 + len)?;
                if c == code {
                    return Some(value);
                }
                at += 2 + len;
            }
        }
    }
    None
}

/// DISCOVER gets an OFFER of the one address, REQUEST an ACK for it (a NAK for any other).
fn dhcp(src: [u8; 6], udp: &[u8]) -> Option<Vec<u8>> {
    let udp_len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if udp[2..4] != [0, 67] || udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    let m = &udp[8..udp_len];
    // A request (op 1) from an Ethernet client, with the DHCP cookie.
    if m.len() < BOOTP_OPTIONS || m[0] != 1 || m[1] != 1 || m[2] != 6 {
        return None;
    }
    if m[236..240] != DHCP_COOKIE {
        return None;
    }
    let options = &m[BOOTP_OPTIONS..];
    let reply_type = match dhcp_option(options, 53)? {
        [DHCPDISCOVER] => DHCPOFFER,
        [DHCPREQUEST] => {
            // The address asked for: the option in SELECTING and INIT-REBOOT, ciaddr when
            // renewing.
            let asked = dhcp_option(options, 50).unwrap_or(&m[12..16]);
            if asked == GUEST_IP { DHCPACK } else { DHCPNAK }
        }
        _ => return None,
    };
    let mut r = vec![0u8; BOOTP_OPTIONS];
    r[0] = 2;
    r[1..3].copy_from_slice(&[1, 6]);
    r[4..8].copy_from_slice(&m[4..8]); // xid
    r[10..12].copy_from_slice(&m[10..12]); // flags
    if reply_type != DHCPNAK {
        r[16..20].copy_from_slice(&GUEST_IP);
        r[20..24].copy_from_slice(&GATEWAY_IP);
    }
    r[28..44].copy_from_slice(&m[28..44]); // chaddr
    r[236..240].copy_from_slice(&DHCP_COOKIE);
    r.extend_from_slice(&[53, 1, reply_type, 54, 4]);
    r.extend_from_slice(&GATEWAY_IP);
    if reply_type != DHCPNAK {
        r.extend_from_slice(&[51, 4]);
        r.extend_from_slice(&LEASE_SECS.to_be_bytes());
        r.extend_from_slice(&[1, 4]);
        r.extend_from_slice(&NETMASK);
        r.extend_from_slice(&[3, 4]);
        r.extend_from_slice(&GATEWAY_IP);
    }
    r.push(255);
    // BOOTP's minimum message length.
    r.resize(r.len().max(300), 0);
    let len = u16::try_from(8 + r.len()).expect("small");
    // Source port 67, destination 68, no checksum (allowed for UDP over IPv4).
    let mut u = vec![0, 67, 0, 68];
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(&r);
    // Broadcast, as the client has no address yet.
    let ip = ipv4_packet(IPPROTO_UDP, [255; 4], &u);
    Some(ethernet(src, ETH_P_IP, &ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn frame(proto: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&proto.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ip_from_guest(proto: u8, src: [u8; 4], dst: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut p = ipv4_packet(proto, dst, body);
        p[12..16].copy_from_slice(&src);
        p[10..12].fill(0);
        let sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        frame(ETH_P_IP, &p)
    }

    fn dhcp_request(kind: u8, requested: Option<[u8; 4]>) -> Vec<u8> {
        let mut m = vec![0u8; BOOTP_OPTIONS];
        m[..3].copy_from_slice(&[1, 1, 6]);
        m[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        m[28..34].copy_from_slice(&GUEST_MAC);
        m[236..240].copy_from_slice(&DHCP_COOKIE);
        m.extend_from_slice(&[53, 1, kind]);
        if let Some(ip) = requested {
            m.extend_from_slice(&[50, 4]);
            m.extend_from_slice(&ip);
        }
        m.push(255);
        let len = u16::try_from(8 + m.len()).unwrap();
        let mut u = vec![0, 68, 0, 67];
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(&m);
        ip_from_guest(IPPROTO_UDP, [0; 4], [255; 4], &u)
    }

    /// The reply's BOOTP message and its DHCP message type, checking the layers around it.
    fn bootp(reply: &[u8]) -> (&[u8], u8) {
        assert_eq!(reply[..6], GUEST_MAC);
        assert_eq!(reply[6..12], GATEWAY_MAC);
        let ip = &reply[ETH_HLEN..];
        assert_eq!(checksum(&ip[..20]), 0, "IPv4 header checksum");
        assert_eq!(ip[12..16], GATEWAY_IP);
        assert_eq!(ip[9], IPPROTO_UDP);
        let udp = &ip[20..];
        assert_eq!(udp[..4], [0, 67, 0, 68]);
        let m = &udp[8..];
        assert_eq!(m[0], 2);
        assert_eq!(m[4..8], [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(m[28..34], GUEST_MAC);
        let kind = dhcp_option(&m[BOOTP_OPTIONS..], 53).unwrap()[0];
        (m, kind)
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack() {
        let offer = answer(&dhcp_request(DHCPDISCOVER, None)).unwrap();
        let (m, kind) = bootp(&offer);
        assert_eq!(kind, DHCPOFFER);
        assert_eq!(m[16..20], GUEST_IP);
        let opts = &m[BOOTP_OPTIONS..];
        assert_eq!(dhcp_option(opts, 54), Some(&GATEWAY_IP[..]));
        assert_eq!(dhcp_option(opts, 1), Some(&NETMASK[..]));
        assert_eq!(dhcp_option(opts, 3), Some(&GATEWAY_IP[..]));
        assert_eq!(dhcp_option(opts, 51), Some(&LEASE_SECS.to_be_bytes()[..]));

        let ack = answer(&dhcp_request(DHCPREQUEST, Some(GUEST_IP))).unwrap();
        let (m, kind) = bootp(&ack);
        assert_eq!(kind, DHCPACK);
        assert_eq!(m[16..20], GUEST_IP);

        let nak = answer(&dhcp_request(DHCPREQUEST, Some([10, 0, 2, 99]))).unwrap();
        let (m, kind) = bootp(&nak);
        assert_eq!(kind, DHCPNAK);
        assert_eq!(m[16..20], [0; 4]);
    }

    #[test]
    fn arp_for_the_gateway_is_answered() {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&GUEST_MAC);
        a.extend_from_slice(&GUEST_IP);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&GATEWAY_IP);
        let r = answer(&frame(ETH_P_ARP, &a)).unwrap();
        assert_eq!(r[..6], GUEST_MAC);
        assert_eq!(r[12..14], ETH_P_ARP.to_be_bytes());
        let p = &r[ETH_HLEN..];
        assert_eq!(p[6..8], [0, 2]);
        assert_eq!(p[8..14], GATEWAY_MAC);
        assert_eq!(p[14..18], GATEWAY_IP);
        assert_eq!(p[18..24], GUEST_MAC);
        assert_eq!(p[24..28], GUEST_IP);
        // Anyone else's address: no answer.
        a[24..28].copy_from_slice(&[10, 0, 2, 7]);
        assert!(answer(&frame(ETH_P_ARP, &a)).is_none());
    }

    #[test]
    fn ping_to_the_gateway_is_echoed() {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"payload!");
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let r = answer(&ip_from_guest(IPPROTO_ICMP, GUEST_IP, GATEWAY_IP, &icmp)).unwrap();
        let ip = &r[ETH_HLEN..];
        assert_eq!(checksum(&ip[..20]), 0);
        assert_eq!(ip[16..20], GUEST_IP);
        let reply = &ip[20..];
        assert_eq!(reply[0], 0);
        assert_eq!(checksum(reply), 0);
        assert_eq!(reply[4..], icmp[4..]);
        // To another address, or with a bad checksum: nothing.
        assert!(answer(&ip_from_guest(IPPROTO_ICMP, GUEST_IP, [10, 0, 2, 3], &icmp)).is_none());
        icmp[9] ^= 1;
        assert!(answer(&ip_from_guest(IPPROTO_ICMP, GUEST_IP, GATEWAY_IP, &icmp)).is_none());
    }

    #[test]
    fn every_truncation_and_garbage_is_dropped_quietly() {
        let good = dhcp_request(DHCPDISCOVER, None);
        for n in 0..good.len() {
            let _ = answer(&good[..n]);
        }
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut f = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = usize::try_from(x).unwrap() % f.len();
                f[at] = x.to_le_bytes()[1];
            }
            if let Some(r) = answer(&f) {
                assert!(r.len() <= good.len().max(ETH_HLEN + 20 + 8 + 300));
            }
        }
    }

    #[test]
    fn the_gateway_thread_answers_on_its_socket_and_ends_with_it() {
        let mut sock = spawn("test").unwrap();
        let f = dhcp_request(DHCPDISCOVER, None);
        sock.write_all(&u32::try_from(f.len()).unwrap().to_be_bytes())
            .unwrap();
        sock.write_all(&f).unwrap();
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).unwrap();
        let mut r = vec![0u8; usize::try_from(u32::from_be_bytes(len)).unwrap()];
        sock.read_exact(&mut r).unwrap();
        assert_eq!(bootp(&r).1, DHCPOFFER);
        // A length no frame has: the gateway stops and closes its end.
        sock.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert_eq!(sock.read(&mut len).unwrap(), 0);
    }
}
