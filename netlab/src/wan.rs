//! WAN profiles and the per-direction shaper that applies them, with no sockets or clocks
//! of its own: the relay passes `now` in and gets each packet's fate back.
//!
//! A [`Shaper`] decides, for each packet or TCP chunk in arrival order, whether it is lost
//! and when it leaves the link. Delivery times never go backwards, so one direction of a
//! link stays first-in first-out: a latency spike holds everything behind it, as a
//! bufferbloated store router does.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How one store's link to the anycast address behaves. Latencies are one way, applied to
/// each direction separately, so the round-trip time is about twice `latency_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WanProfile {
    /// Share of UDP packets lost, in percent (0-100). On TCP a loss costs a
    /// retransmission delay of `tcp_retransmit_ms` instead.
    pub loss_percent: f64,
    /// Base one-way latency.
    pub latency_ms: f64,
    /// Each packet's latency is the base plus uniform noise in `[-jitter, +jitter]`.
    pub jitter_ms: f64,
    /// Probability that a spike interval carries a latency spike.
    pub spike_probability: f64,
    /// Length of one spike interval.
    pub spike_interval_ms: u64,
    /// Smallest extra latency of a spike.
    pub spike_min_ms: f64,
    /// Largest extra latency of a spike.
    pub spike_max_ms: f64,
    /// Bandwidth cap per direction in kilobits per second; `None` is uncapped.
    pub bandwidth_kbps: Option<u64>,
    /// Longest queue (time to drain at the cap) before packets are tail-dropped.
    pub queue_ms: u64,
    /// Delay a lost TCP segment costs (the retransmission timeout).
    pub tcp_retransmit_ms: u64,
    /// Windows when the link is down: every packet dropped, TCP refused and cut.
    pub offline: Vec<OfflineWindow>,
    /// The store's network drops all UDP: only the TCP fallback gets through.
    pub udp_blocked: bool,
}

impl Default for WanProfile {
    /// A perfect link: no loss, no latency, no cap.
    fn default() -> Self {
        Self {
            loss_percent: 0.0,
            latency_ms: 0.0,
            jitter_ms: 0.0,
            spike_probability: 0.0,
            spike_interval_ms: 1_000,
            spike_min_ms: 300.0,
            spike_max_ms: 800.0,
            bandwidth_kbps: None,
            queue_ms: 2_000,
            tcp_retransmit_ms: 200,
            offline: Vec::new(),
            udp_blocked: false,
        }
    }
}

/// A time when the link is down, counted from the start of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineWindow {
    /// Seconds after the start when the link goes down.
    pub start_s: f64,
    /// How long it stays down, in seconds.
    pub duration_s: f64,
    /// Repeat the window every so many seconds (from its start); once when absent.
    #[serde(default)]
    pub every_s: Option<f64>,
}

/// Why a profile is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    /// A field is outside its range.
    #[error("wan profile field `{field}` is {value}, expected {expected}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
        /// What it should be.
        expected: &'static str,
    },
}

impl WanProfile {
    /// Checks every field's range.
    ///
    /// # Errors
    /// [`ProfileError::OutOfRange`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let check = |field, value: f64, ok: bool, expected| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(ProfileError::OutOfRange {
                    field,
                    value,
                    expected,
                })
            }
        };
        let loss = self.loss_percent;
        check(
            "loss_percent",
            loss,
            (0.0..=100.0).contains(&loss),
            "0 to 100",
        )?;
        check(
            "latency_ms",
            self.latency_ms,
            self.latency_ms >= 0.0,
            ">= 0",
        )?;
        check("jitter_ms", self.jitter_ms, self.jitter_ms >= 0.0, ">= 0")?;
        let p = self.spike_probability;
        check("spike_probability", p, (0.0..=1.0).contains(&p), "0 to 1")?;
        let interval = self.spike_interval_ms as f64;
        check("spike_interval_ms", interval, interval > 0.0, "> 0")?;
        let (lo, hi) = (self.spike_min_ms, self.spike_max_ms);
        check("spike_min_ms", lo, lo >= 0.0, ">= 0")?;
        check("spike_max_ms", hi, hi >= lo, ">= spike_min_ms")?;
        if let Some(kbps) = self.bandwidth_kbps {
            check("bandwidth_kbps", kbps as f64, kbps > 0, "> 0")?;
        }
        for window in &self.offline {
            check(
                "offline.start_s",
                window.start_s,
                window.start_s >= 0.0,
                ">= 0",
            )?;
            let d = window.duration_s;
            check("offline.duration_s", d, d > 0.0, "> 0")?;
            if let Some(every) = window.every_s {
                check("offline.every_s", every, every > d, "> duration_s")?;
            }
        }
        Ok(())
    }

    /// Whether the link is down `elapsed` after the start of the run.
    pub fn is_offline(&self, elapsed: Duration) -> bool {
        let t = elapsed.as_secs_f64();
        self.offline.iter().any(|w| {
            if t < w.start_s {
                return false;
            }
            let since = match w.every_s {
                Some(every) => (t - w.start_s) % every,
                None => t - w.start_s,
            };
            since < w.duration_s
        })
    }
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Leaves the link at this instant.
    Deliver(Instant),
    /// Dropped.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// The queue in front of the bandwidth cap was full.
    Queue,
    /// The link was in an offline window.
    Offline,
    /// UDP is blocked on this link.
    Blocked,
}

/// One direction of one link: the profile plus its random state and queue.
#[derive(Debug)]
pub struct Shaper {
    profile: WanProfile,
    rng: ChaCha8Rng,
    start: Instant,
    /// When the bandwidth cap has sent everything admitted so far.
    link_free_at: Instant,
    /// The latest delivery time handed out: later packets never leave before it.
    last_delivery: Instant,
    spike: Option<(u64, Duration)>,
}

impl Shaper {
    /// A shaper for `profile` whose run (offline windows, spike intervals) starts at `start`,
    /// drawing from `seed`.
    pub fn new(profile: WanProfile, seed: u64, start: Instant) -> Self {
        Self {
            profile,
            rng: ChaCha8Rng::seed_from_u64(seed),
            start,
            link_free_at: start,
            last_delivery: start,
            spike: None,
        }
    }

    /// The profile.
    pub fn profile(&self) -> &WanProfile {
        &self.profile
    }

    /// Whether the link is down at `now`.
    pub fn is_offline(&self, now: Instant) -> bool {
        self.profile
            .is_offline(now.saturating_duration_since(self.start))
    }

    /// The fate of a UDP datagram of `bytes` arriving at `now`.
    pub fn datagram(&mut self, now: Instant, bytes: usize) -> Fate {
        if self.profile.udp_blocked {
            return Fate::Drop(DropReason::Blocked);
        }
        self.admit(now, bytes, true)
    }

    /// The fate of a chunk of a TCP stream: never lost, but a loss costs a retransmission.
    pub fn segment(&mut self, now: Instant, bytes: usize) -> Fate {
        self.admit(now, bytes, false)
    }

    fn admit(&mut self, now: Instant, bytes: usize, lossy: bool) -> Fate {
        if self.is_offline(now) {
            return Fate::Drop(DropReason::Offline);
        }

        // 1. Random loss (every packet draws, so the sequence of fates is repeatable).
        let lost = self
            .rng
            .gen_bool((self.profile.loss_percent / 100.0).clamp(0.0, 1.0));
        if lost && lossy {
            return Fate::Drop(DropReason::Loss);
        }

        // 2. The bandwidth cap: serialise behind what is queued, tail-drop past the queue.
        let mut departs = now.max(self.link_free_at);
        if let Some(kbps) = self.profile.bandwidth_kbps {
            let backlog = departs.saturating_duration_since(now);
            if backlog > Duration::from_millis(self.profile.queue_ms) {
                return Fate::Drop(DropReason::Queue);
            }
            let seconds = (bytes as f64 * 8.0) / (kbps as f64 * 1_000.0);
            departs += Duration::from_secs_f64(seconds);
            self.link_free_at = departs;
        }

        // 3. Propagation: base, jitter, the current spike, and a retransmission on TCP.
        let jitter = if self.profile.jitter_ms > 0.0 {
            self.rng
                .gen_range(-self.profile.jitter_ms..=self.profile.jitter_ms)
        } else {
            0.0
        };
        let mut delay_ms = (self.profile.latency_ms + jitter).max(0.0);
        delay_ms += self.spike_at(now).as_secs_f64() * 1_000.0;
        if lost {
            delay_ms += self.profile.tcp_retransmit_ms as f64;
        }
        let delivers =
            (departs + Duration::from_secs_f64(delay_ms / 1_000.0)).max(self.last_delivery);
        self.last_delivery = delivers;
        Fate::Deliver(delivers)
    }

    /// The extra latency of the spike interval holding `now` (zero when it has none). Each
    /// interval draws once, when its first packet arrives.
    fn spike_at(&mut self, now: Instant) -> Duration {
        let interval = self.profile.spike_interval_ms.max(1) as u128;
        let index = (now.saturating_duration_since(self.start).as_millis() / interval) as u64;
        if let Some((seen, extra)) = self.spike
            && seen == index
        {
            return extra;
        }
        let extra = if self
            .rng
            .gen_bool(self.profile.spike_probability.clamp(0.0, 1.0))
        {
            let ms = self
                .rng
                .gen_range(self.profile.spike_min_ms..=self.profile.spike_max_ms);
            Duration::from_secs_f64(ms / 1_000.0)
        } else {
            Duration::ZERO
        };
        self.spike = Some((index, extra));
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(shaper: &mut Shaper, start: Instant, n: u64, gap: Duration) -> Vec<Fate> {
        (0..n)
            .map(|i| shaper.datagram(start + gap * i as u32, 1_200))
            .collect()
    }

    #[test]
    fn loss_rate_matches_the_profile() {
        let start = Instant::now();
        let profile = WanProfile {
            loss_percent: 2.0,
            ..WanProfile::default()
        };
        let fates = deliveries(
            &mut Shaper::new(profile, 7, start),
            start,
            20_000,
            Duration::ZERO,
        );
        let lost = fates
            .iter()
            .filter(|f| matches!(f, Fate::Drop(DropReason::Loss)))
            .count();
        // Binomial(20000, 0.02): mean 400, sd 19.8; 300-500 is five sd either side.
        assert!((300..=500).contains(&lost), "lost {lost}");
    }

    #[test]
    fn mean_latency_is_the_base_and_jitter_stays_in_bounds() {
        let start = Instant::now();
        let profile = WanProfile {
            latency_ms: 40.0,
            jitter_ms: 10.0,
            ..WanProfile::default()
        };
        let mut shaper = Shaper::new(profile, 3, start);
        // Packets 100 ms apart, so FIFO ordering never holds one behind another.
        let gap = Duration::from_millis(100);
        let delays: Vec<f64> = deliveries(&mut shaper, start, 2_000, gap)
            .iter()
            .enumerate()
            .map(|(i, fate)| match fate {
                Fate::Deliver(at) => (*at - (start + gap * i as u32)).as_secs_f64() * 1e3,
                Fate::Drop(r) => panic!("dropped {r:?}"),
            })
            .collect();
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        // Uniform(-10, 10) has sd 5.77; the mean of 2000 has sd 0.13 ms.
        assert!((mean - 40.0).abs() < 1.0, "mean {mean}");
        assert!(delays.iter().all(|d| (29.99..=50.01).contains(d)));
    }

    #[test]
    fn spikes_hit_about_their_share_of_intervals_with_300_to_800_ms() {
        let start = Instant::now();
        let profile = WanProfile {
            spike_probability: 0.1,
            spike_interval_ms: 100,
            ..WanProfile::default()
        };
        let mut shaper = Shaper::new(profile, 11, start);
        // One packet a second: each lands in its own interval and no spike (at most
        // 800 ms) holds the next packet behind it.
        let gap = Duration::from_secs(1);
        let mut spiked = 0;
        for (i, fate) in deliveries(&mut shaper, start, 2_000, gap)
            .iter()
            .enumerate()
        {
            let Fate::Deliver(at) = fate else {
                panic!("dropped {fate:?}");
            };
            let extra = (*at - (start + gap * i as u32)).as_secs_f64() * 1e3;
            if extra > 0.0 {
                spiked += 1;
                assert!((300.0..=800.0).contains(&extra), "{extra}");
            }
        }
        // Binomial(2000, 0.1): mean 200, sd 13.4; 140-260 is four and a half sd.
        assert!((140..=260).contains(&spiked), "spiked {spiked}");
    }

    #[test]
    fn bandwidth_cap_serialises_back_to_back_packets() {
        let start = Instant::now();
        let profile = WanProfile {
            bandwidth_kbps: Some(1_000),
            queue_ms: 10_000,
            ..WanProfile::default()
        };
        let mut shaper = Shaper::new(profile, 1, start);
        let mut last = start;
        for _ in 0..100 {
            match shaper.datagram(start, 1_000) {
                Fate::Deliver(at) => last = at,
                Fate::Drop(r) => panic!("dropped {r:?}"),
            }
        }
        // 100 x 1000 bytes = 800 kbit at 1000 kbit/s = 800 ms.
        let took = (last - start).as_secs_f64();
        assert!((took - 0.8).abs() < 0.001, "took {took}");
    }

    #[test]
    fn a_full_queue_tail_drops() {
        let start = Instant::now();
        let profile = WanProfile {
            bandwidth_kbps: Some(80),
            queue_ms: 500,
            ..WanProfile::default()
        };
        let mut shaper = Shaper::new(profile, 1, start);
        // 1200 bytes at 80 kbit/s take 120 ms: packet k finds k x 120 ms queued, so packets
        // 0-4 (at most 480 ms) fit under 500 ms and the sixth is the first dropped.
        let fates = deliveries(&mut shaper, start, 20, Duration::ZERO);
        let queued = fates
            .iter()
            .filter(|f| matches!(f, Fate::Deliver(_)))
            .count();
        assert_eq!(queued, 5);
        assert!(matches!(fates[19], Fate::Drop(DropReason::Queue)));
    }

    #[test]
    fn offline_windows_drop_and_repeat() {
        let start = Instant::now();
        let profile = WanProfile {
            offline: vec![OfflineWindow {
                start_s: 1.0,
                duration_s: 0.5,
                every_s: Some(2.0),
            }],
            ..WanProfile::default()
        };
        let mut shaper = Shaper::new(profile, 1, start);
        let at = |s: f64| start + Duration::from_secs_f64(s);
        for (t, down) in [
            (0.5, false),
            (1.2, true),
            (1.6, false),
            (3.3, true),
            (3.9, false),
        ] {
            let fate = shaper.datagram(at(t), 10);
            assert_eq!(
                matches!(fate, Fate::Drop(DropReason::Offline)),
                down,
                "t={t}"
            );
        }
    }

    #[test]
    fn tcp_segments_are_never_lost_but_pay_for_loss() {
        let start = Instant::now();
        let profile = WanProfile {
            loss_percent: 100.0,
            tcp_retransmit_ms: 200,
            ..WanProfile::default()
        };
        let mut shaper = Shaper::new(profile, 1, start);
        assert_eq!(
            shaper.segment(start, 100),
            Fate::Deliver(start + Duration::from_millis(200))
        );
        assert_eq!(shaper.datagram(start, 100), Fate::Drop(DropReason::Loss));
    }

    #[test]
    fn same_seed_same_fates() {
        let start = Instant::now();
        let profile = WanProfile {
            loss_percent: 5.0,
            jitter_ms: 20.0,
            latency_ms: 30.0,
            ..WanProfile::default()
        };
        let gap = Duration::from_millis(50);
        let a = deliveries(&mut Shaper::new(profile.clone(), 9, start), start, 500, gap);
        let b = deliveries(&mut Shaper::new(profile, 9, start), start, 500, gap);
        assert_eq!(a, b);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let profile = WanProfile {
            loss_percent: 120.0,
            ..WanProfile::default()
        };
        let err = profile.validate().expect_err("out of range");
        assert!(err.to_string().contains("loss_percent"), "{err}");
        assert!(WanProfile::default().validate().is_ok());
    }
}
