//! TCP segmentation and coalescing for a TUN device opened with
//! `IFF_VNET_HDR` and TSO/checksum offload: every packet read or written
//! carries a `virtio_net_hdr` in front.
//!
//! - Outbound, the kernel hands us TCP super-segments of up to 64 KB with
//!   one IP/TCP header; [`TsoPlan`] and [`TsoPlan::segment`] cut them into
//!   MTU-sized segments with their own IP length, IPv4 id and header
//!   checksum, TCP sequence number, flags and checksum, ready to encrypt.
//! - Inbound, [`Coalescer`] joins decrypted in-order TCP segments of one
//!   flow back into one super-packet, written with a GSO header so the
//!   kernel's TCP stack sees one packet per batch instead of dozens.
//!
//! Everything here is pure: byte slices in, byte slices out, no I/O.

/// Size of `struct virtio_net_hdr` (the TUN default vnet header size).
pub(crate) const VNET_HDR_LEN: usize = 10;

/// `virtio_net_hdr.flags`: the checksum from `csum_start` on is partial.
pub(crate) const F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type` values.
pub(crate) const GSO_NONE: u8 = 0;
pub(crate) const GSO_TCPV4: u8 = 1;
pub(crate) const GSO_TCPV6: u8 = 4;
/// Bit of `gso_type`: the packet carries ECN (CWR on the first segment).
pub(crate) const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Offset of the checksum field in a TCP header.
const TCP_CSUM_OFFSET: usize = 16;
/// Largest IPv4 total length / IPv6 payload length.
const MAX_IP_LEN: usize = 65_535;

/// `struct virtio_net_hdr` (fields in host byte order, as TUN uses them
/// unless told otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    pub(crate) flags: u8,
    pub(crate) gso_type: u8,
    pub(crate) hdr_len: u16,
    pub(crate) gso_size: u16,
    pub(crate) csum_start: u16,
    pub(crate) csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `b`.
    pub(crate) fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b`.
    pub(crate) fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

// ------------------------------------------------------------ checksums

/// Bytes per round of the checksum loops: eight 32-bit words, one per
/// accumulator, which the compiler turns into vector adds.
const SUM_CHUNK: usize = 32;

/// Adds `data` to a ones'-complement sum (RFC 1071) kept in a 64-bit
/// accumulator; [`fold`] reduces it. `data` must start at an even offset
/// of the summed message.
pub(crate) fn sum(data: &[u8], acc: u64) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = data.chunks_exact(SUM_CHUNK);
    for c in &mut chunks {
        add_words(c, &mut lanes);
    }
    finish_sum(&lanes, acc, chunks.remainder())
}

/// Copies `src` into `dst` (of the same length) and adds `src` to a
/// ones'-complement sum, in one pass over the data.
pub(crate) fn copy_sum(dst: &mut [u8], src: &[u8], acc: u64) -> u64 {
    let mut lanes = [0u64; 8];
    let mut d = dst.chunks_exact_mut(SUM_CHUNK);
    let mut s = src.chunks_exact(SUM_CHUNK);
    for (dc, sc) in (&mut d).zip(&mut s) {
        dc.copy_from_slice(sc);
        add_words(sc, &mut lanes);
    }
    let rest = s.remainder();
    d.into_remainder().copy_from_slice(rest);
    finish_sum(&lanes, acc, rest)
}

/// Adds the eight 32-bit words of a [`SUM_CHUNK`], read in the host's
/// byte order (no byte swaps), one to each accumulator.
#[inline]
fn add_words(chunk: &[u8], lanes: &mut [u64; 8]) {
    for (k, lane) in lanes.iter_mut().enumerate() {
        let w = [
            chunk[4 * k],
            chunk[4 * k + 1],
            chunk[4 * k + 2],
            chunk[4 * k + 3],
        ];
        *lane += u64::from(u32::from_ne_bytes(w));
    }
}

/// Joins the accumulators of [`add_words`] to `acc` (a big-endian sum)
/// and adds the tail. A ones'-complement sum of byte-swapped words is the
/// byte-swapped sum (RFC 1071, section 2 B), so the folded host-order sum
/// is swapped to big-endian once, at the end.
fn finish_sum(lanes: &[u64; 8], acc: u64, tail: &[u8]) -> u64 {
    // Each accumulator stays below 2^32 times the number of chunks.
    let host: u64 = lanes.iter().sum();
    sum_be(tail, acc + u64::from(u16::from_be(fold(host))))
}

/// [`sum`] for short data, 32 bits at a time in network byte order.
fn sum_be(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut rest = chunks.remainder();
    if rest.len() >= 4 {
        acc += u64::from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]));
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        acc += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let Some(&b) = rest.first() {
        acc += u64::from(b) << 8;
    }
    acc
}

/// Folds a sum to 16 bits (not complemented).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 16 bits.
    #[allow(clippy::cast_possible_truncation)]
    let v = acc as u16;
    v
}

/// Sum of the TCP/UDP pseudo-header: addresses, protocol, L4 length.
pub(crate) fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    sum(dst, sum(src, 0)) + u64::from(proto) + l4_len as u64
}

/// Completes a partial checksum (`F_NEEDS_CSUM`): the field at
/// `start + offset` holds the pseudo-header sum; the checksum covers
/// everything from `start` to the end.
pub(crate) fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    if at + 2 > pkt.len() {
        return None;
    }
    let mut c = !fold(sum(&pkt[start..], 0));
    if c == 0 {
        // Zero means "no checksum" to UDP; 0xffff is the same value.
        c = 0xffff;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Some(())
}

fn ipv4_header_checksum(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = !fold(sum(hdr, 0));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Source and destination address of an IPv4 or IPv6 header.
fn addrs(pkt: &[u8], v6: bool) -> (&[u8], &[u8]) {
    if v6 {
        (&pkt[8..24], &pkt[24..40])
    } else {
        (&pkt[12..16], &pkt[16..20])
    }
}

// ------------------------------------------------------------ segmentation

/// Why a packet from the TUN device cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OffloadError {
    /// Headers inconsistent with the vnet header or truncated.
    Malformed(&'static str),
    /// A GSO type we did not enable (UDP, ...).
    Unsupported(u8),
}

/// How one TCP super-segment splits into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TsoPlan {
    v6: bool,
    /// Bytes of IP header (IPv6: with extension headers).
    ip_len: usize,
    /// Bytes of IP + TCP header.
    hdr_len: usize,
    mss: usize,
    payload: usize,
}

impl TsoPlan {
    /// Checks `pkt` (the packet after the vnet header) against `hdr`.
    /// The kernel's `hdr_len` is not trusted (it may cover payload); the
    /// header lengths come from the packet itself.
    pub(crate) fn new(pkt: &[u8], hdr: &VnetHdr) -> Result<TsoPlan, OffloadError> {
        let v6 = match hdr.gso_type & !GSO_ECN {
            GSO_TCPV4 => false,
            GSO_TCPV6 => true,
            other => return Err(OffloadError::Unsupported(other)),
        };
        let version = pkt.first().map(|b| b >> 4);
        if version != Some(if v6 { 6 } else { 4 }) {
            return Err(OffloadError::Malformed(
                "IP version does not match GSO type",
            ));
        }
        let ip_len = usize::from(hdr.csum_start);
        if ip_len < if v6 { 40 } else { 20 } || ip_len + 20 > pkt.len() {
            return Err(OffloadError::Malformed("bad csum_start"));
        }
        if !v6 && (usize::from(pkt[0] & 0x0f) * 4 != ip_len || pkt[9] != PROTO_TCP) {
            return Err(OffloadError::Malformed("IPv4 header length or protocol"));
        }
        let tcp_len = usize::from(pkt[ip_len + 12] >> 4) * 4;
        let hdr_len = ip_len + tcp_len;
        if tcp_len < 20 || hdr_len > pkt.len() {
            return Err(OffloadError::Malformed("TCP header length"));
        }
        let mss = usize::from(hdr.gso_size);
        if mss == 0 {
            return Err(OffloadError::Malformed("zero gso_size"));
        }
        Ok(TsoPlan {
            v6,
            ip_len,
            hdr_len,
            mss,
            payload: pkt.len() - hdr_len,
        })
    }

    /// Number of segments (at least one, even without payload).
    pub(crate) fn count(&self) -> usize {
        self.payload.div_ceil(self.mss).max(1)
    }

    /// Writes segment `i` of `pkt` into `out` (at least as long as `pkt`)
    /// and returns its length.
    pub(crate) fn segment(&self, pkt: &[u8], i: usize, out: &mut [u8]) -> usize {
        let (ip_len, hdr_len) = (self.ip_len, self.hdr_len);
        let start = hdr_len + i * self.mss;
        let end = (start + self.mss).min(pkt.len());
        let seg_payload = end.saturating_sub(start);
        let total = hdr_len + seg_payload;
        let last = i + 1 >= self.count();
        out[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
        let seg = &mut out[..total];
        if self.v6 {
            let plen = u16::try_from(total - 40).unwrap_or(u16::MAX);
            seg[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tl = u16::try_from(total).unwrap_or(u16::MAX);
            seg[2..4].copy_from_slice(&tl.to_be_bytes());
            // Truncation intended: the IPv4 id wraps.
            #[allow(clippy::cast_possible_truncation)]
            let id = be16(seg, 4).wrapping_add(i as u16);
            seg[4..6].copy_from_slice(&id.to_be_bytes());
            ipv4_header_checksum(&mut seg[..ip_len]);
        }
        let tcp = ip_len;
        // Truncation intended: sequence numbers wrap.
        #[allow(clippy::cast_possible_truncation)]
        let seq = be32(seg, tcp + 4).wrapping_add((i * self.mss) as u32);
        seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        if !last {
            seg[tcp + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            seg[tcp + 13] &= !TCP_CWR;
        }
        seg[tcp + TCP_CSUM_OFFSET] = 0;
        seg[tcp + TCP_CSUM_OFFSET + 1] = 0;
        let (src, dst) = addrs(seg, self.v6);
        let ph = pseudo_header_sum(src, dst, PROTO_TCP, total - tcp);
        let (head, body) = seg.split_at_mut(hdr_len);
        // The TCP header is a multiple of 4 bytes: sums concatenate.
        let acc = copy_sum(body, &pkt[start.min(end)..end], sum(&head[tcp..], ph));
        let c = !fold(acc);
        seg[tcp + TCP_CSUM_OFFSET..tcp + TCP_CSUM_OFFSET + 2].copy_from_slice(&c.to_be_bytes());
        total
    }
}

// ------------------------------------------------------------ coalescing

/// Identity of a TCP flow (one direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
    v6: bool,
}

/// A decrypted TCP segment that may join others.
#[derive(Debug, Clone, Copy)]
struct Segment {
    flow: Flow,
    /// The segment can be merged (pure ACK or ACK|PSH with payload, no
    /// IP options or fragments; its checksum is checked on copy).
    candidate: bool,
    ip_len: usize,
    tcp_len: usize,
    seq: u32,
    ack: u32,
    psh: bool,
    payload: usize,
}

/// Parses an IPv4/IPv6 TCP packet; `None` for anything else.
fn parse_tcp(pkt: &[u8]) -> Option<Segment> {
    let v6 = match pkt.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let mut flow = Flow {
        src: [0; 16],
        dst: [0; 16],
        ports: [0; 4],
        v6,
    };
    let (ip_len, plain) = if v6 {
        if pkt.len() < 40 || pkt[6] != PROTO_TCP {
            return None;
        }
        flow.src.copy_from_slice(&pkt[8..24]);
        flow.dst.copy_from_slice(&pkt[24..40]);
        (40, usize::from(be16(pkt, 4)) + 40 == pkt.len())
    } else {
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if ihl < 20 || pkt.len() < ihl || pkt[9] != PROTO_TCP {
            return None;
        }
        flow.src[..4].copy_from_slice(&pkt[12..16]);
        flow.dst[..4].copy_from_slice(&pkt[16..20]);
        // No options, no fragment (MF clear, offset 0), exact length.
        let unfragmented = pkt[6] & 0x3f == 0 && pkt[7] == 0;
        (
            ihl,
            ihl == 20 && unfragmented && usize::from(be16(pkt, 2)) == pkt.len(),
        )
    };
    if pkt.len() < ip_len + 20 {
        return None;
    }
    flow.ports.copy_from_slice(&pkt[ip_len..ip_len + 4]);
    let tcp_len = usize::from(pkt[ip_len + 12] >> 4) * 4;
    if tcp_len < 20 || pkt.len() < ip_len + tcp_len {
        return None;
    }
    let flags = pkt[ip_len + 13];
    let payload = pkt.len() - ip_len - tcp_len;
    // The checksum is checked while the payload is copied.
    let candidate = plain && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH) && payload > 0;
    Some(Segment {
        flow,
        candidate,
        ip_len,
        tcp_len,
        seq: be32(pkt, ip_len + 4),
        ack: be32(pkt, ip_len + 8),
        psh: flags & TCP_PSH != 0,
        payload,
    })
}

/// Sum of pseudo-header and TCP header of a parsed segment.
fn header_sum(pkt: &[u8], s: &Segment) -> u64 {
    let (src, dst) = addrs(pkt, s.flow.v6);
    let ph = pseudo_header_sum(src, dst, PROTO_TCP, pkt.len() - s.ip_len);
    sum(&pkt[s.ip_len..s.ip_len + s.tcp_len], ph)
}

/// One packet to write: a single packet, or segments merged into one.
#[derive(Debug)]
struct Item {
    /// vnet header space + packet, in `buf[..len]`.
    buf: Box<[u8]>,
    len: usize,
    /// `None`: not TCP; written as it came.
    seg: Option<Segment>,
    /// Payload size of the first segment: the GSO size.
    gso_size: usize,
    merged: usize,
    /// Sequence number expected next.
    next_seq: u32,
    /// No more segments may join (PSH seen, a short segment, or not a
    /// candidate).
    closed: bool,
}

/// Most segments merged into one super-packet.
const MAX_MERGED: usize = 64;

/// Joins in-order TCP segments of a flow into GSO super-packets; other
/// packets pass through in their order. Buffers are reused across batches.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    items: Vec<Item>,
    len: usize,
}

impl Coalescer {
    /// Packets held before a flush is needed.
    pub(crate) const CAPACITY: usize = 128;

    /// Whether [`push`](Self::push) needs a flush first.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= Self::CAPACITY
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a decrypted IP packet (at most 65,535 bytes; longer ones are
    /// ignored).
    pub(crate) fn push(&mut self, pkt: &[u8]) {
        if pkt.len() > MAX_IP_LEN {
            return;
        }
        let seg = parse_tcp(pkt).map(|mut s| {
            if s.candidate
                && let Some(item) = self.items[..self.len]
                    .iter_mut()
                    .rev()
                    .find(|it| it.seg.is_some_and(|o| o.flow == s.flow))
                && can_append(item, &s, pkt)
            {
                if append(item, &s, pkt) {
                    return None;
                }
                // Bad checksum: never merged, written as it came.
                s.candidate = false;
            }
            Some(s)
        });
        let seg = match seg {
            Some(None) => return,
            Some(Some(s)) => Some(s),
            None => None,
        };
        if self.len == self.items.len() {
            self.items.push(Item {
                buf: vec![0; VNET_HDR_LEN + MAX_IP_LEN].into_boxed_slice(),
                len: 0,
                seg: None,
                gso_size: 0,
                merged: 0,
                next_seq: 0,
                closed: true,
            });
        }
        let item = &mut self.items[self.len];
        self.len += 1;
        item.len = VNET_HDR_LEN + pkt.len();
        item.merged = 0;
        let dst = &mut item.buf[VNET_HDR_LEN..item.len];
        match seg {
            Some(mut s) => {
                let hl = s.ip_len + s.tcp_len;
                dst[..hl].copy_from_slice(&pkt[..hl]);
                if s.candidate {
                    let acc = copy_sum(&mut dst[hl..], &pkt[hl..], header_sum(pkt, &s));
                    s.candidate = fold(acc) == 0xffff;
                } else {
                    dst[hl..].copy_from_slice(&pkt[hl..]);
                }
                item.seg = Some(s);
                item.gso_size = s.payload;
                // Truncation intended: sequence numbers wrap.
                #[allow(clippy::cast_possible_truncation)]
                let next = s.seq.wrapping_add(s.payload as u32);
                item.next_seq = next;
                item.closed = !s.candidate || s.psh;
            }
            None => {
                dst.copy_from_slice(pkt);
                item.seg = None;
                item.gso_size = 0;
                item.closed = true;
            }
        }
    }

    /// Fills in vnet headers, lengths and checksums; then the packets, in
    /// order, each with its vnet header in front.
    pub(crate) fn finish(&mut self) -> impl Iterator<Item = &[u8]> {
        for item in &mut self.items[..self.len] {
            finish_item(item);
        }
        self.items[..self.len].iter().map(|it| &it.buf[..it.len])
    }

    /// Forgets the packets (keeps the buffers).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

fn can_append(item: &Item, s: &Segment, pkt: &[u8]) -> bool {
    let Some(head) = item.seg else {
        return false;
    };
    let h = &item.buf[VNET_HDR_LEN..item.len];
    let same_ip_fields = if s.flow.v6 {
        // Version + traffic class, hop limit.
        h[0] == pkt[0] && h[1] >> 4 == pkt[1] >> 4 && h[7] == pkt[7]
    } else {
        // TOS, DF and reserved bits, TTL.
        h[1] == pkt[1] && h[6] >> 5 == pkt[6] >> 5 && h[8] == pkt[8]
    };
    let hl = s.ip_len + s.tcp_len;
    !item.closed
        && s.candidate
        && item.merged + 1 < MAX_MERGED
        && s.seq == item.next_seq
        && s.ack == head.ack
        && s.tcp_len == head.tcp_len
        && s.payload <= item.gso_size
        && h.len() + s.payload <= MAX_IP_LEN
        && same_ip_fields
        && h[s.ip_len + 20..hl] == pkt[s.ip_len + 20..hl]
}

/// Appends the payload of `pkt` to `item` if its checksum is right;
/// returns whether it did.
fn append(item: &mut Item, s: &Segment, pkt: &[u8]) -> bool {
    let hl = s.ip_len + s.tcp_len;
    let end = item.len + s.payload;
    let acc = copy_sum(&mut item.buf[item.len..end], &pkt[hl..], header_sum(pkt, s));
    if fold(acc) != 0xffff {
        return false;
    }
    item.len = end;
    item.merged += 1;
    // Truncation intended: sequence numbers wrap.
    #[allow(clippy::cast_possible_truncation)]
    let next = item.next_seq.wrapping_add(s.payload as u32);
    item.next_seq = next;
    if s.psh {
        let at = VNET_HDR_LEN + s.ip_len + 13;
        item.buf[at] |= TCP_PSH;
        item.closed = true;
    }
    if s.payload < item.gso_size {
        item.closed = true;
    }
    true
}

fn finish_item(item: &mut Item) {
    let (hdr_space, pkt) = item.buf[..item.len].split_at_mut(VNET_HDR_LEN);
    let mut hdr = VnetHdr::default();
    if let Some(s) = item.seg
        && item.merged > 0
    {
        let v6 = s.flow.v6;
        let total = pkt.len();
        if v6 {
            let plen = u16::try_from(total - 40).unwrap_or(u16::MAX);
            pkt[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tl = u16::try_from(total).unwrap_or(u16::MAX);
            pkt[2..4].copy_from_slice(&tl.to_be_bytes());
            ipv4_header_checksum(&mut pkt[..s.ip_len]);
        }
        // The kernel completes the checksum from the pseudo-header sum.
        let (src, dst) = addrs(pkt, v6);
        let ph = fold(pseudo_header_sum(src, dst, PROTO_TCP, total - s.ip_len));
        let at = s.ip_len + TCP_CSUM_OFFSET;
        pkt[at..at + 2].copy_from_slice(&ph.to_be_bytes());
        let small = |v: usize| u16::try_from(v).unwrap_or(u16::MAX);
        hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: small(s.ip_len + s.tcp_len),
            gso_size: small(item.gso_size),
            csum_start: small(s.ip_len),
            // Fits trivially.
            #[allow(clippy::cast_possible_truncation)]
            csum_offset: TCP_CSUM_OFFSET as u16,
        };
    }
    hdr.encode(hdr_space);
}

#[cfg(test)]
mod tests;
