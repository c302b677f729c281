//! Measurements from the agents' probe reports, counted so that no single
//! reporter can move them: one vote per reporter per peer, one vote per
//! reporter per pair of sites, and per pair the upper median over
//! reporters.
//!
//! Rules, for the reporters of a pair of sites (the members of either site
//! that probed a member of the other):
//!
//! - A reporter's vote: up if any of its probes into the other site is up
//!   (a dead member is not a dead link); its latency and loss are the upper
//!   medians of its up probes. Repeated entries for one peer count once
//!   (the first).
//! - The link is up when at least as many reporters see it up as down:
//!   it is not marked down while another reporter sees it up (with two
//!   reporters), and with three or more one reporter cannot flip what the
//!   others agree on.
//! - Its latency and loss are the upper medians (index `n / 2` of the
//!   sorted values) over the reporters that see it up. With three or more
//!   reporters, one liar cannot move the result outside the range the
//!   others measured (nor at all when they agree); with two, the higher
//!   value wins, so a liar can only make the link look worse, never better
//!   (and a link is never made to look better to pull traffic through the
//!   liar's site).
//!
//! Who is a reporter, which site it is in and which peers it may report
//! about is the caller's to establish (the controller takes only a
//! reporter's configured peers, with sites from its own state).

use std::collections::{BTreeMap, BTreeSet};

use super::graph::{Link, Measurements};

/// One reporter's probe of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeVote {
    /// The reporting member (its id).
    pub reporter: String,
    /// The reporter's site.
    pub reporter_site: String,
    /// The probed member (its id).
    pub peer: String,
    /// The probed member's site.
    pub peer_site: String,
    /// What the probes saw.
    pub link: Link,
}

/// The value at index `n / 2` of the sorted values (the higher of the two
/// middle ones for an even count); `None` when empty.
fn upper_median(mut v: Vec<u32>) -> Option<u32> {
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    Some(*v.select_nth_unstable(mid).1)
}

/// Up-votes summarised: up, with the upper medians of latency and loss;
/// down when there is none.
fn summarise(up: &[Link]) -> Link {
    match (
        upper_median(up.iter().map(|l| l.latency_us).collect()),
        upper_median(up.iter().map(|l| l.loss_ppm).collect()),
    ) {
        (Some(latency_us), Some(loss_ppm)) => Link {
            latency_us,
            loss_ppm,
            up: true,
        },
        _ => Link::down(),
    }
}

/// The first vote per (reporter, peer); votes inside one site are dropped.
fn one_per_peer(votes: &[ProbeVote]) -> BTreeMap<(&str, &str), &ProbeVote> {
    let mut first = BTreeMap::new();
    for v in votes {
        if v.reporter_site != v.peer_site {
            first
                .entry((v.reporter.as_str(), v.peer.as_str()))
                .or_insert(v);
        }
    }
    first
}

impl Measurements {
    /// Site links from probe votes (see the module's rules); no member is
    /// marked down.
    pub fn from_votes(votes: &[ProbeVote]) -> Self {
        // Per (pair of sites, reporter): its probes into the other site.
        let mut per_reporter: BTreeMap<((&str, &str), &str), Vec<Link>> = BTreeMap::new();
        for v in one_per_peer(votes).into_values() {
            let pair = if v.reporter_site <= v.peer_site {
                (v.reporter_site.as_str(), v.peer_site.as_str())
            } else {
                (v.peer_site.as_str(), v.reporter_site.as_str())
            };
            per_reporter
                .entry((pair, v.reporter.as_str()))
                .or_default()
                .push(v.link);
        }
        let mut per_pair: BTreeMap<(&str, &str), Vec<Link>> = BTreeMap::new();
        for ((pair, _), links) in per_reporter {
            let up: Vec<Link> = links.into_iter().filter(|l| l.up).collect();
            per_pair.entry(pair).or_default().push(summarise(&up));
        }
        let mut m = Measurements::default();
        for ((a, b), reporters) in per_pair {
            let (up, down): (Vec<Link>, Vec<Link>) = reporters.into_iter().partition(|l| l.up);
            let link = if up.len() >= down.len() {
                summarise(&up)
            } else {
                Link::down()
            };
            m.set_link(a, b, link);
        }
        m
    }
}

/// The probed members more reporters (one vote each) find unreachable than
/// reachable, among those probed at all.
pub fn found_unreachable(votes: &[ProbeVote]) -> BTreeSet<String> {
    let mut tally: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut first = BTreeMap::new();
    for v in votes {
        first
            .entry((v.reporter.as_str(), v.peer.as_str()))
            .or_insert(v);
    }
    for v in first.into_values() {
        let t = tally.entry(v.peer.as_str()).or_default();
        if v.link.up {
            t.0 += 1;
        } else {
            t.1 += 1;
        }
    }
    tally
        .into_iter()
        .filter(|(_, (up, down))| down > up)
        .map(|(peer, _)| peer.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vote(reporter: &str, peer: &str, link: Link) -> ProbeVote {
        let site = |m: &str| m[..1].to_owned();
        ProbeVote {
            reporter: reporter.to_owned(),
            reporter_site: site(reporter),
            peer: peer.to_owned(),
            peer_site: site(peer),
            link,
        }
    }

    fn lossy(latency_us: u32, loss_ppm: u32) -> Link {
        Link {
            latency_us,
            loss_ppm,
            up: true,
        }
    }

    #[test]
    fn votes_become_site_links_by_upper_median_over_reporters() {
        let m = Measurements::from_votes(&[
            vote("a1", "b1", Link::up(10_000)),
            vote("a1", "b2", Link::up(12_000)),
            vote("b1", "a1", Link::up(30_000)),
            vote("a2", "b1", Link::up(20_000)),
            vote("a2", "c1", Link::down()),
            vote("a1", "a2", Link::up(1)),
        ]);
        // Reporters a1 (12 ms, upper median of 10 and 12), a2 (20), b1 (30).
        assert_eq!(m.link("b", "a"), Some(Link::up(20_000)));
        assert_eq!(m.link("a", "c"), Some(Link::down()));
        assert_eq!(m.link("a", "a"), None);
    }

    #[test]
    fn a_link_is_up_while_as_many_reporters_see_it_up_as_down() {
        let two = Measurements::from_votes(&[
            vote("a1", "b1", Link::up(10_000)),
            vote("b1", "a1", Link::down()),
        ]);
        assert_eq!(two.link("a", "b"), Some(Link::up(10_000)));
        let three = Measurements::from_votes(&[
            vote("a1", "b1", Link::up(10_000)),
            vote("b1", "a1", Link::down()),
            vote("a2", "b1", Link::down()),
        ]);
        assert_eq!(three.link("a", "b"), Some(Link::down()));
    }

    #[test]
    fn members_are_unreachable_by_majority_of_reporters() {
        let votes = [
            vote("a1", "b1", Link::down()),
            vote("c1", "b1", Link::down()),
            vote("a2", "b1", Link::up(5)),
            vote("a1", "c1", Link::down()),
            vote("b1", "c1", Link::up(5)),
            // One reporter repeating itself is one vote.
            vote("a1", "a2", Link::down()),
            vote("a1", "a2", Link::down()),
            vote("b1", "a2", Link::up(5)),
        ];
        assert_eq!(found_unreachable(&votes), BTreeSet::from(["b1".to_owned()]));
    }

    fn link() -> impl Strategy<Value = Link> {
        (any::<bool>(), 0u32..2_000_000, 0u32..=1_000_000).prop_map(|(up, latency_us, loss)| Link {
            latency_us: if up { latency_us } else { 0 },
            loss_ppm: if up { loss } else { 0 },
            up,
        })
    }

    /// Honest reporters a0, a1, ... each probing b1 and b2 (up) with the
    /// given latency and loss.
    fn honest(values: &[(u32, u32)]) -> Vec<ProbeVote> {
        values
            .iter()
            .enumerate()
            .flat_map(|(i, (lat, loss))| {
                ["b1", "b2"].map(|p| vote(&format!("a{i}"), p, lossy(*lat, *loss)))
            })
            .collect()
    }

    proptest! {
        #[test]
        fn a_thousand_duplicates_of_one_reporter_move_nothing(
            values in proptest::collection::vec((1u32..1_000_000, 0u32..1_000_000), 1..6),
            dups in proptest::collection::vec(link(), 1000),
        ) {
            let votes = honest(&values);
            let before = Measurements::from_votes(&votes);
            // a0 repeats its vote about b1 a thousand times, with any values.
            let mut flooded = votes.clone();
            flooded.extend(dups.into_iter().map(|l| vote("a0", "b1", l)));
            prop_assert_eq!(Measurements::from_votes(&flooded), before.clone());
            // Or floods the front: its first word counts, the others are
            // ignored whatever they say.
            let mut front: Vec<ProbeVote> = (0..1000).map(|_| vote("a0", "b1", Link::down())).collect();
            front.extend(votes);
            let m = Measurements::from_votes(&front);
            // a0 still reaches b2: its vote stays up.
            prop_assert!(m.link("a", "b").is_some_and(|l| l.up));
        }

        #[test]
        fn one_liar_among_three_or_more_stays_within_the_honest_range(
            values in proptest::collection::vec((1u32..1_000_000, 0u32..100_000), 2..7),
            lies in proptest::collection::vec(link(), 1..1000),
            liar_site_b in any::<bool>(),
        ) {
            let mut votes = honest(&values);
            // The liar sits in either site; its many entries (about many
            // peers, some repeated) are one vote.
            for (i, l) in lies.into_iter().enumerate() {
                let peer = format!("{}{}", if liar_site_b { "a" } else { "b" }, i % 7);
                let liar = if liar_site_b { "bx" } else { "ax" };
                votes.push(vote(liar, &peer, l));
            }
            let link = Measurements::from_votes(&votes).link("a", "b").expect("measured");
            prop_assert!(link.up, "honest reporters all see it up: {:?}", link);
            let lat: Vec<u32> = values.iter().map(|v| v.0).collect();
            let loss: Vec<u32> = values.iter().map(|v| v.1).collect();
            let within = |x: u32, v: &[u32]| {
                v.iter().min().is_some_and(|m| *m <= x) && v.iter().max().is_some_and(|m| x <= *m)
            };
            prop_assert!(within(link.latency_us, &lat), "latency {} outside {:?}", link.latency_us, lat);
            prop_assert!(within(link.loss_ppm, &loss), "loss {} outside {:?}", link.loss_ppm, loss);
        }

        #[test]
        fn one_liar_cannot_move_what_the_others_agree_on(
            n in 2usize..7,
            lat in 1u32..1_000_000,
            loss in 0u32..100_000,
            honest_up in any::<bool>(),
            lie in link(),
        ) {
            let same = if honest_up { lossy(lat, loss) } else { Link::down() };
            let mut votes: Vec<ProbeVote> =
                (0..n).map(|i| vote(&format!("a{i}"), "b1", same)).collect();
            votes.push(vote("b9", "a0", lie));
            let want = if honest_up { same } else { Link::down() };
            prop_assert_eq!(Measurements::from_votes(&votes).link("a", "b"), Some(want));
        }

        #[test]
        fn with_two_reporters_a_liar_only_makes_a_link_look_worse(
            lat in 1u32..1_000_000,
            loss in 0u32..100_000,
            lie in link(),
        ) {
            let votes = [vote("a1", "b1", lossy(lat, loss)), vote("b1", "a1", lie)];
            let link = Measurements::from_votes(&votes).link("a", "b").expect("measured");
            prop_assert!(link.up, "not down while a1 sees it up");
            prop_assert!(link.latency_us >= lat && link.loss_ppm >= loss, "{:?}", link);
        }
    }
}
