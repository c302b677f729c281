//! Request-rate limits of the agent API: token buckets for each node's
//! Reports and for Registers as a whole. A request over the limit is
//! refused with RESOURCE_EXHAUSTED and changes nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tonic::Status;

/// Reports a node may send in a burst; agents report every 10 s and
/// within a second of a reachability change.
pub(crate) const REPORT_BURST: f64 = 10.0;
/// Reports per second a node may sustain.
pub(crate) const REPORTS_PER_SEC: f64 = 1.0;
/// Registrations the controller accepts in a burst (all nodes together).
pub(crate) const REGISTER_BURST: f64 = 100.0;
/// Registrations per second the controller sustains.
pub(crate) const REGISTERS_PER_SEC: f64 = 20.0;

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token if there is one; returns how long until the next
    /// one otherwise.
    fn take(&mut self, burst: f64, rate: f64, now: Instant) -> Result<(), f64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }
}

/// The agent API's rate limits.
#[derive(Debug)]
pub(crate) struct Limits {
    reports: Mutex<HashMap<String, Bucket>>,
    registers: Mutex<Bucket>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            reports: Mutex::new(HashMap::new()),
            registers: Mutex::new(Bucket::full(REGISTER_BURST, Instant::now())),
        }
    }
}

impl Limits {
    /// Admits one Report from `node_id`.
    pub(crate) fn report(&self, node_id: &str) -> Result<(), Status> {
        self.report_at(node_id, Instant::now())
    }

    fn report_at(&self, node_id: &str, now: Instant) -> Result<(), Status> {
        let mut buckets = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        // Node ids come from authenticated certificates: the map is
        // bounded by the number of nodes.
        let b = buckets
            .entry(node_id.to_owned())
            .or_insert_with(|| Bucket::full(REPORT_BURST, now));
        b.take(REPORT_BURST, REPORTS_PER_SEC, now).map_err(|wait| {
            Status::resource_exhausted(format!(
                "too many reports from node {node_id}: at most {REPORTS_PER_SEC} per second \
                 (bursts of {REPORT_BURST}); retry in {wait:.1} s; this report was ignored"
            ))
        })
    }

    /// Admits one Register (all callers share one bucket).
    pub(crate) fn register(&self) -> Result<(), Status> {
        self.register_at(Instant::now())
    }

    fn register_at(&self, now: Instant) -> Result<(), Status> {
        let mut b = self.registers.lock().unwrap_or_else(|p| p.into_inner());
        b.take(REGISTER_BURST, REGISTERS_PER_SEC, now)
            .map_err(|wait| {
                Status::resource_exhausted(format!(
                    "too many registrations: the controller accepts {REGISTERS_PER_SEC} per second \
                 (bursts of {REGISTER_BURST}); retry in {wait:.1} s"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reports_beyond_the_burst_are_refused_until_tokens_refill() {
        let l = Limits::default();
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(l.report_at("n-a", t0).is_ok(), "report {i} of the burst");
        }
        let err = l.report_at("n-a", t0).expect_err("11th refused");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("n-a"), "{}", err.message());
        assert!(l.report_at("n-b", t0).is_ok(), "other nodes have their own");
        assert!(l.report_at("n-a", t0 + Duration::from_millis(500)).is_err());
        assert!(l.report_at("n-a", t0 + Duration::from_millis(1000)).is_ok());
        assert!(
            l.report_at("n-a", t0 + Duration::from_millis(1100))
                .is_err()
        );
        // A long silence refills no more than the burst.
        let later = t0 + Duration::from_secs(3600);
        let admitted = (0..50)
            .filter(|_| l.report_at("n-a", later).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn registrations_share_one_bucket() {
        let l = Limits::default();
        let t0 = Instant::now();
        let admitted = (0..500).filter(|_| l.register_at(t0).is_ok()).count();
        assert_eq!(admitted, 100);
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..500).filter(|_| l.register_at(t1).is_ok()).count();
        assert_eq!(admitted, 20);
    }
}
