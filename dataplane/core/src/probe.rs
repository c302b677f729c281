//! Peer probes: the wire format of a probe and the statistics of one peer's
//! recent probes (round-trip time, loss, reachability).
//!
//! The agent sends every peer a small UDP probe at a fixed interval and
//! echoes the probes it receives; [`ProbeWindow`] keeps the last
//! [`WINDOW`] probes of one peer. Times are arguments (nanoseconds of a
//! monotonic clock the caller reads), so everything here is deterministic.

use std::collections::VecDeque;

/// Probes a window remembers.
pub const WINDOW: usize = 20;
/// Length of a probe datagram.
pub const PROBE_LEN: usize = 16;
/// First bytes of every probe.
pub const MAGIC: [u8; 4] = *b"WFP1";

/// Whether a probe asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Sent to a peer, which echoes it.
    Request,
    /// A peer's echo of our request.
    Reply,
}

/// One probe datagram: magic, kind, 3 zero bytes, sequence number
/// (big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Request or reply.
    pub kind: ProbeKind,
    /// The sender's sequence number, echoed in the reply.
    pub seq: u64,
}

/// Why bytes are not a probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadProbe {
    /// Not [`PROBE_LEN`] bytes.
    #[error("probe of {0} bytes, want {PROBE_LEN}")]
    Length(usize),
    /// Does not start with [`MAGIC`].
    #[error("not a Weft probe (bad magic)")]
    Magic,
    /// An unknown kind byte, or non-zero padding.
    #[error("probe kind {0} is unknown")]
    Kind(u8),
}

impl Probe {
    /// The datagram.
    #[must_use]
    pub fn encode(self) -> [u8; PROBE_LEN] {
        let mut b = [0u8; PROBE_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = match self.kind {
            ProbeKind::Request => 1,
            ProbeKind::Reply => 2,
        };
        b[8..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    /// Parses a datagram.
    ///
    /// # Errors
    /// [`BadProbe`] for anything but an encoded probe.
    pub fn decode(b: &[u8]) -> Result<Probe, BadProbe> {
        if b.len() != PROBE_LEN {
            return Err(BadProbe::Length(b.len()));
        }
        if b[..4] != MAGIC {
            return Err(BadProbe::Magic);
        }
        let kind = match (b[4], &b[5..8]) {
            (1, [0, 0, 0]) => ProbeKind::Request,
            (2, [0, 0, 0]) => ProbeKind::Reply,
            (k, _) => return Err(BadProbe::Kind(k)),
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..]);
        Ok(Probe {
            kind,
            seq: u64::from_be_bytes(seq),
        })
    }
}

/// What the window says about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeStats {
    /// Median round-trip time of the answered probes, in microseconds
    /// (`None`: none answered).
    pub rtt_us: Option<u64>,
    /// Unanswered probes per thousand, among those whose answer is overdue.
    pub loss_permille: u32,
    /// Whether one of the last [`ProbeWindow::down_after`] overdue probes
    /// was answered.
    pub reachable: bool,
    /// Probes the statistics are based on (sent and overdue or answered).
    pub samples: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    seq: u64,
    at_ns: u64,
    rtt_ns: Option<u64>,
}

/// The last [`WINDOW`] probes sent to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeWindow {
    sent: VecDeque<Sent>,
    /// A probe unanswered this long counts as lost.
    timeout_ns: u64,
    /// Consecutive lost probes after which the peer is unreachable.
    down_after: usize,
}

impl ProbeWindow {
    /// A window where a probe is lost after `timeout_ns` and a peer is
    /// unreachable after `down_after` consecutive losses (at least 1).
    #[must_use]
    pub fn new(timeout_ns: u64, down_after: usize) -> Self {
        ProbeWindow {
            sent: VecDeque::with_capacity(WINDOW),
            timeout_ns,
            down_after: down_after.max(1),
        }
    }

    /// Consecutive losses that make a peer unreachable.
    #[must_use]
    pub fn down_after(&self) -> usize {
        self.down_after
    }

    /// Records probe `seq` sent at `now_ns`, forgetting the oldest beyond
    /// [`WINDOW`].
    pub fn sent(&mut self, seq: u64, now_ns: u64) {
        if self.sent.len() == WINDOW {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent {
            seq,
            at_ns: now_ns,
            rtt_ns: None,
        });
    }

    /// Records the reply to `seq` received at `now_ns`. Replies to probes
    /// the window forgot, duplicates and replies after the timeout are
    /// ignored; returns whether it counted.
    ///
    /// A reply that ends an outage (the peer was unreachable) forgets the
    /// probes sent before it: they describe the outage, not the link now,
    /// and would keep its loss high for a whole window after it recovered.
    pub fn replied(&mut self, seq: u64, now_ns: u64) -> bool {
        let timeout = self.timeout_ns;
        let Some(i) = self.sent.iter().position(|s| s.seq == seq) else {
            return false;
        };
        let s = self.sent[i];
        if s.rtt_ns.is_some() || now_ns < s.at_ns || now_ns - s.at_ns > timeout {
            return false;
        }
        let st = self.stats(now_ns);
        let was_down = !st.reachable && st.samples as usize >= self.down_after;
        self.sent[i].rtt_ns = Some(now_ns - s.at_ns);
        if was_down {
            self.sent.drain(..i);
        }
        true
    }

    /// The statistics at `now_ns`: a probe sent less than the timeout ago
    /// and not yet answered is neither lost nor answered.
    #[must_use]
    pub fn stats(&self, now_ns: u64) -> ProbeStats {
        let settled: Vec<&Sent> = self
            .sent
            .iter()
            .filter(|s| s.rtt_ns.is_some() || now_ns.saturating_sub(s.at_ns) > self.timeout_ns)
            .collect();
        let mut rtts: Vec<u64> = settled.iter().filter_map(|s| s.rtt_ns).collect();
        rtts.sort_unstable();
        let lost = settled.len() - rtts.len();
        let samples = u32::try_from(settled.len()).unwrap_or(u32::MAX);
        let loss_permille = if settled.is_empty() {
            0
        } else {
            u32::try_from(lost * 1000 / settled.len()).unwrap_or(1000)
        };
        let recent = settled.iter().rev().take(self.down_after);
        let reachable = recent.clone().any(|s| s.rtt_ns.is_some())
            || (settled.len() < self.down_after && !rtts.is_empty());
        ProbeStats {
            rtt_us: rtts.get(rtts.len() / 2).map(|ns| ns / 1000),
            loss_permille,
            reachable,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_reply_ending_an_outage_forgets_the_outage() {
        let mut w = ProbeWindow::new(1000 * MS, 3);
        let mut t = 0;
        for seq in 0..4 {
            w.sent(seq, t);
            assert!(w.replied(seq, t + 30 * MS));
            t += 500 * MS;
        }
        // Ten probes lost: unreachable (8 of the 12 settled lost).
        for seq in 4..14 {
            w.sent(seq, t);
            t += 500 * MS;
        }
        let st = w.stats(t);
        assert!(!st.reachable);
        assert_eq!(st.loss_permille, 666);
        // The link is back: the first reply makes it reachable and loss-free.
        w.sent(14, t);
        assert!(w.replied(14, t + 30 * MS));
        let st = w.stats(t + 30 * MS);
        assert!(st.reachable);
        assert_eq!(
            (st.loss_permille, st.samples, st.rtt_us),
            (0, 1, Some(30_000))
        );
        // An ordinary loss while reachable is remembered.
        w.sent(15, t + 500 * MS);
        w.sent(16, t + 1000 * MS);
        assert!(w.replied(16, t + 1030 * MS));
        let st = w.stats(t + 2600 * MS);
        assert_eq!((st.samples, st.loss_permille), (3, 333));
    }

    #[test]
    fn probes_round_trip_and_garbage_is_refused() {
        for kind in [ProbeKind::Request, ProbeKind::Reply] {
            let p = Probe { kind, seq: 77 };
            assert_eq!(Probe::decode(&p.encode()), Ok(p));
        }
        assert_eq!(Probe::decode(b"short"), Err(BadProbe::Length(5)));
        let mut b = Probe {
            kind: ProbeKind::Request,
            seq: 1,
        }
        .encode();
        b[0] = b'X';
        assert_eq!(Probe::decode(&b), Err(BadProbe::Magic));
        b[0] = b'W';
        b[4] = 9;
        assert_eq!(Probe::decode(&b), Err(BadProbe::Kind(9)));
        b[4] = 1;
        b[6] = 1;
        assert_eq!(Probe::decode(&b), Err(BadProbe::Kind(1)));
    }

    #[test]
    fn rtt_is_the_median_and_pending_probes_do_not_count() {
        let mut w = ProbeWindow::new(1000 * MS, 3);
        for (seq, rtt) in [(0, 30), (1, 32), (2, 90)] {
            w.sent(seq, seq * 500 * MS);
            assert!(w.replied(seq, seq * 500 * MS + rtt * MS));
        }
        w.sent(3, 1500 * MS);
        let s = w.stats(1600 * MS);
        assert_eq!(s.rtt_us, Some(32_000));
        assert_eq!((s.loss_permille, s.samples), (0, 3));
        assert!(s.reachable);
        // Overdue: probe 3 is lost.
        let s = w.stats(2600 * MS);
        assert_eq!((s.loss_permille, s.samples), (250, 4));
        assert!(s.reachable, "one loss is not down");
    }

    #[test]
    fn consecutive_losses_make_a_peer_unreachable_and_a_reply_brings_it_back() {
        let mut w = ProbeWindow::new(100 * MS, 3);
        w.sent(0, 0);
        w.replied(0, 10 * MS);
        for seq in 1..=3 {
            w.sent(seq, seq * 200 * MS);
        }
        assert!(!w.stats(1000 * MS).reachable);
        w.sent(4, 1000 * MS);
        assert!(w.replied(4, 1020 * MS));
        assert!(w.stats(1020 * MS).reachable);
    }

    #[test]
    fn late_duplicate_and_unknown_replies_are_ignored() {
        let mut w = ProbeWindow::new(100 * MS, 2);
        w.sent(5, 0);
        assert!(!w.replied(5, 200 * MS), "after the timeout");
        assert!(!w.replied(6, 10 * MS), "never sent");
        w.sent(7, 300 * MS);
        assert!(w.replied(7, 310 * MS));
        assert!(!w.replied(7, 311 * MS), "duplicate");
        assert_eq!(w.stats(1000 * MS).loss_permille, 500);
    }

    proptest! {
        #[test]
        fn stats_stay_in_range(
            events in proptest::collection::vec((any::<bool>(), 0u64..50, 0u64..300), 0..100),
        ) {
            let mut w = ProbeWindow::new(200 * MS, 3);
            let mut now = 0;
            for (seq, (answered, step, rtt)) in (0u64..).zip(events) {
                now += step * MS + 1;
                w.sent(seq, now);
                if answered {
                    w.replied(seq, now + rtt * MS);
                }
                let s = w.stats(now);
                prop_assert!(s.loss_permille <= 1000);
                prop_assert!(s.samples as usize <= WINDOW);
                if let Some(rtt) = s.rtt_us {
                    prop_assert!(rtt <= 200_000, "a counted RTT is within the timeout");
                }
                prop_assert_eq!(s.rtt_us.is_some(), s.samples > 0 && s.loss_permille < 1000);
            }
        }
    }
}
