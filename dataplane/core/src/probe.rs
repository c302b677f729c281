//! Peer probes: the wire format of a probe, the statistics of one peer's
//! recent probes (round-trip time, loss, reachability), and the matching
//! of replies to peers by token ([`Prober`]).
//!
//! The agent sends every peer a small UDP probe at a fixed interval and
//! echoes the probes it receives; [`ProbeWindow`] keeps the last
//! [`WINDOW`] probes of one peer. Each peer gets an unpredictable token
//! (the agent draws it) carried by every request and echoed in the reply:
//! replies are matched by token, not by source address, so two peers
//! behind one NAT address are measured apart, and nobody off the path can
//! answer for a peer. Times and tokens are arguments (nanoseconds of a
//! monotonic clock, random values the caller draws), so everything here
//! is deterministic.

use std::collections::{BTreeMap, VecDeque};

/// Probes a window remembers.
pub const WINDOW: usize = 20;
/// Length of a probe datagram.
pub const PROBE_LEN: usize = 24;
/// First bytes of every probe: `WFP` and the format version.
pub const MAGIC: [u8; 4] = *b"WFP2";
/// The format version this code speaks (the last byte of [`MAGIC`]).
pub const VERSION: u8 = b'2';

/// Whether a probe asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Sent to a peer, which echoes it.
    Request,
    /// A peer's echo of our request.
    Reply,
}

/// One probe datagram: magic (with the version), kind, 3 zero bytes,
/// sequence number and token (both big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Request or reply.
    pub kind: ProbeKind,
    /// The sender's sequence number, echoed in the reply.
    pub seq: u64,
    /// The sender's token for the probed peer, echoed in the reply.
    pub token: u64,
}

/// Why bytes are not a probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadProbe {
    /// A Weft probe of another format version (e.g. `1`, from an agent
    /// that predates probe tokens).
    #[error("Weft probe of format version {0:?}; this agent speaks version 2 (upgrade the peer)")]
    Version(char),
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
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..].copy_from_slice(&self.token.to_be_bytes());
        b
    }

    /// Parses a datagram.
    ///
    /// # Errors
    /// [`BadProbe`] for anything but an encoded probe; a probe of another
    /// format version is named as such.
    pub fn decode(b: &[u8]) -> Result<Probe, BadProbe> {
        if b.len() >= 4 && b[..3] == MAGIC[..3] && b[3] != VERSION {
            return Err(BadProbe::Version(char::from(b[3])));
        }
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
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(w)
        };
        Ok(Probe {
            kind,
            seq: word(8),
            token: word(16),
        })
    }

    /// The reply to a request: the same sequence number and token. The
    /// echo side keeps no state and sends no more than it received.
    #[must_use]
    pub fn reply(self) -> Probe {
        Probe {
            kind: ProbeKind::Reply,
            ..self
        }
    }
}

/// A reply that matches no probed peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("probe reply with unknown token {token:#018x}")]
pub struct UnknownToken {
    /// The token the reply carried.
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Probed {
    token: u64,
    window: ProbeWindow,
}

/// The probed peers (any ordered id, e.g. a WireGuard key), each with its
/// token and [`ProbeWindow`]; replies are matched to peers by token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prober<P> {
    peers: BTreeMap<P, Probed>,
    by_token: BTreeMap<u64, P>,
    timeout_ns: u64,
    down_after: usize,
    seq: u64,
    unknown: u64,
}

impl<P: Ord + Clone> Prober<P> {
    /// A prober whose windows lose a probe after `timeout_ns` and find a
    /// peer unreachable after `down_after` consecutive losses.
    #[must_use]
    pub fn new(timeout_ns: u64, down_after: usize) -> Self {
        Prober {
            peers: BTreeMap::new(),
            by_token: BTreeMap::new(),
            timeout_ns,
            down_after,
            seq: 0,
            unknown: 0,
        }
    }

    /// Probes exactly `peers` from now on: a new peer gets a token from
    /// `draw` (redrawn while it is taken), a peer no longer listed is
    /// forgotten with its window and token.
    pub fn set_peers<'a>(
        &mut self,
        peers: impl IntoIterator<Item = &'a P>,
        mut draw: impl FnMut() -> u64,
    ) where
        P: 'a,
    {
        let wanted: std::collections::BTreeSet<&P> = peers.into_iter().collect();
        self.peers.retain(|p, _| wanted.contains(p));
        self.by_token.retain(|_, p| wanted.contains(&*p));
        for p in wanted {
            if self.peers.contains_key(p) {
                continue;
            }
            let mut token = draw();
            while self.by_token.contains_key(&token) {
                token = draw();
            }
            self.by_token.insert(token, p.clone());
            self.peers.insert(
                p.clone(),
                Probed {
                    token,
                    window: ProbeWindow::new(self.timeout_ns, self.down_after),
                },
            );
        }
    }

    /// The next request to `peer` (`None`: not probed). Call
    /// [`Prober::sent`] once it is sent.
    pub fn request(&mut self, peer: &P) -> Option<Probe> {
        let probed = self.peers.get(peer)?;
        self.seq = self.seq.wrapping_add(1);
        Some(Probe {
            kind: ProbeKind::Request,
            seq: self.seq,
            token: probed.token,
        })
    }

    /// Records that `probe` (from [`Prober::request`]) went to `peer` at
    /// `now_ns`.
    pub fn sent(&mut self, peer: &P, probe: Probe, now_ns: u64) {
        if let Some(p) = self.peers.get_mut(peer)
            && p.token == probe.token
        {
            p.window.sent(probe.seq, now_ns);
        }
    }

    /// Takes a reply received at `now_ns`, whatever address it came from:
    /// its token names the peer. Returns the peer and whether the reply
    /// counted (see [`ProbeWindow::replied`]).
    ///
    /// # Errors
    /// [`UnknownToken`] (and counted) when no probed peer has its token.
    pub fn handle_reply(&mut self, reply: Probe, now_ns: u64) -> Result<(P, bool), UnknownToken> {
        let Some(p) = self.by_token.get(&reply.token) else {
            self.unknown = self.unknown.saturating_add(1);
            return Err(UnknownToken { token: reply.token });
        };
        let counted = self
            .peers
            .get_mut(p)
            .is_some_and(|probed| probed.window.replied(reply.seq, now_ns));
        Ok((p.clone(), counted))
    }

    /// Replies ignored so far because their token matched no peer.
    #[must_use]
    pub fn unknown_replies(&self) -> u64 {
        self.unknown
    }

    /// Every probed peer's statistics at `now_ns`.
    #[must_use]
    pub fn stats(&self, now_ns: u64) -> BTreeMap<P, ProbeStats> {
        self.peers
            .iter()
            .map(|(p, probed)| (p.clone(), probed.window.stats(now_ns)))
            .collect()
    }
}

/// A budget of echoes per probe interval, so that a flood of requests
/// makes the agent send at most a bounded number of replies: refilled to
/// twice the peer count plus [`EchoBudget::SLACK`] each interval (a peer
/// probes once per interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EchoBudget {
    left: usize,
    refused: u64,
}

impl EchoBudget {
    /// Echoes allowed per interval beyond twice the peer count.
    pub const SLACK: usize = 64;

    /// Starts an interval for `peers` peers.
    pub fn refill(&mut self, peers: usize) {
        self.left = peers.saturating_mul(2).saturating_add(Self::SLACK);
    }

    /// Whether one more echo may go out in this interval (counted when
    /// not).
    pub fn take(&mut self) -> bool {
        if self.left == 0 {
            self.refused = self.refused.saturating_add(1);
            return false;
        }
        self.left -= 1;
        true
    }

    /// Requests left unanswered so far because the budget was spent.
    #[must_use]
    pub fn refused(&self) -> u64 {
        self.refused
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
            let p = Probe {
                kind,
                seq: 77,
                token: 0x0123_4567_89ab_cdef,
            };
            assert_eq!(Probe::decode(&p.encode()), Ok(p));
        }
        assert_eq!(Probe::decode(b"short"), Err(BadProbe::Length(5)));
        let mut b = Probe {
            kind: ProbeKind::Request,
            seq: 1,
            token: 2,
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
    fn old_format_probes_are_refused_by_name() {
        // Version 1: "WFP1", kind, 3 zero bytes, sequence; no token.
        let mut v1 = [0u8; 16];
        v1[..4].copy_from_slice(b"WFP1");
        v1[4] = 1;
        v1[15] = 7;
        let e = Probe::decode(&v1).expect_err("version 1 is refused");
        assert_eq!(e, BadProbe::Version('1'));
        assert!(e.to_string().contains("version '1'"), "{e}");
        // Padded to the new length, still version 1.
        let mut padded = [0u8; PROBE_LEN];
        padded[..16].copy_from_slice(&v1);
        assert_eq!(Probe::decode(&padded), Err(BadProbe::Version('1')));
    }

    #[test]
    fn the_echo_keeps_sequence_and_token() {
        let req = Probe {
            kind: ProbeKind::Request,
            seq: 9,
            token: 0xfeed,
        };
        let rep = req.reply();
        assert_eq!(
            (rep.kind, rep.seq, rep.token),
            (ProbeKind::Reply, 9, 0xfeed)
        );
        assert_eq!(rep.encode().len(), req.encode().len(), "no amplification");
    }

    /// Draws tokens from a fixed list (the agent draws random ones).
    fn tokens(list: &[u64]) -> impl FnMut() -> u64 + '_ {
        let mut i = 0;
        move || {
            let t = list[i % list.len()];
            i += 1;
            t
        }
    }

    #[test]
    fn two_peers_behind_one_address_are_measured_apart_by_token() {
        // p1 and p2 sit behind one NAT address: every reply comes from
        // the same IP, and p2's are slow and partly lost.
        let mut prober = Prober::new(1000 * MS, 3);
        prober.set_peers(&["p1", "p2"], tokens(&[11, 22]));
        let mut t = 0;
        for round in 0..6u64 {
            let r1 = prober.request(&"p1").expect("p1 probed");
            let r2 = prober.request(&"p2").expect("p2 probed");
            prober.sent(&"p1", r1, t);
            prober.sent(&"p2", r2, t);
            assert_eq!(
                prober.handle_reply(r1.reply(), t + 10 * MS),
                Ok(("p1", true))
            );
            if round % 2 == 0 {
                assert_eq!(
                    prober.handle_reply(r2.reply(), t + 80 * MS),
                    Ok(("p2", true))
                );
            }
            t += 500 * MS;
        }
        let stats = prober.stats(t + 2000 * MS);
        assert_eq!(stats[&"p1"].rtt_us, Some(10_000));
        assert_eq!(stats[&"p1"].loss_permille, 0);
        assert_eq!(stats[&"p2"].rtt_us, Some(80_000));
        assert_eq!(stats[&"p2"].loss_permille, 500);
    }

    #[test]
    fn replies_with_unknown_tokens_are_ignored_and_counted() {
        let mut prober = Prober::new(1000 * MS, 3);
        prober.set_peers(&["p1"], tokens(&[11]));
        let r = prober.request(&"p1").expect("probed");
        prober.sent(&"p1", r, 0);
        let forged = Probe { token: 12, ..r }.reply();
        assert_eq!(
            prober.handle_reply(forged, 5 * MS),
            Err(UnknownToken { token: 12 })
        );
        assert_eq!(prober.unknown_replies(), 1);
        assert_eq!(prober.stats(5 * MS)[&"p1"].samples, 0, "nothing counted");
        // A peer dropped takes its token with it.
        prober.set_peers(&[], tokens(&[0]));
        assert!(prober.handle_reply(r.reply(), 6 * MS).is_err());
        assert_eq!(prober.unknown_replies(), 2);
    }

    #[test]
    fn tokens_are_unique_and_kept_while_the_peer_is() {
        let mut prober = Prober::new(1000 * MS, 3);
        // The source repeats itself: the second peer gets the next draw.
        prober.set_peers(&["p1", "p2"], tokens(&[5, 5, 6]));
        let t1 = prober.request(&"p1").expect("p1").token;
        let t2 = prober.request(&"p2").expect("p2").token;
        assert_ne!(t1, t2);
        prober.set_peers(&["p1", "p2", "p3"], tokens(&[7]));
        assert_eq!(prober.request(&"p1").expect("p1").token, t1);
        assert_eq!(prober.request(&"p3").expect("p3").token, 7);
    }

    #[test]
    fn the_echo_budget_bounds_replies_per_interval() {
        let mut budget = EchoBudget::default();
        budget.refill(3);
        let sent = (0..1000).filter(|_| budget.take()).count();
        assert_eq!(sent, 6 + EchoBudget::SLACK);
        assert_eq!(budget.refused(), 1000 - sent as u64);
        budget.refill(3);
        assert!(budget.take(), "a new interval, a new budget");
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
