//! Training windows: the local hours in which a store lets Fedmesh train.
//!
//! A window is a range of wall-clock times in the store's own time zone, such as
//! `01:00-04:00`, or `22:00-02:00` across midnight. It is judged on the local clock, so a
//! daylight-saving change stretches or shortens it the way the store's staff would expect:
//! on the night the clocks go back, `01:00-04:00` lasts four real hours (01:00-02:00 happens
//! twice); on the night they go forward it lasts two.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Timestamp, ToSpan};

/// Why a window specification or its time zone was refused.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// The range is not `HH:MM-HH:MM`.
    #[error("training window {0:?} is not of the form HH:MM-HH:MM (e.g. 01:00-04:00)")]
    Syntax(String),
    /// The range is empty.
    #[error("training window {0:?} starts and ends at the same time")]
    Empty(String),
    /// The time zone name is not in the tz database.
    #[error("unknown time zone {name:?}: {source}")]
    TimeZone {
        /// The name as configured.
        name: String,
        /// What the tz database said.
        source: jiff::Error,
    },
}

/// A daily training window in a store's local time.
#[derive(Clone)]
pub struct TrainingWindow {
    start: Time,
    /// `None` means the end of the day (`24:00`).
    end: Option<Time>,
    tz: TimeZone,
    spec: String,
}

impl TrainingWindow {
    /// Parses `HH:MM-HH:MM` (the end may be `24:00`) in the IANA time zone `tz_name`.
    ///
    /// # Errors
    ///
    /// [`WindowError`] when the range is malformed or empty, or the zone is unknown.
    pub fn new(spec: &str, tz_name: &str) -> Result<Self, WindowError> {
        let syntax = || WindowError::Syntax(spec.to_owned());
        let (start, end) = spec.split_once('-').ok_or_else(syntax)?;
        let start = parse_hhmm(start.trim()).ok_or_else(syntax)?;
        let end = match end.trim() {
            "24:00" => None,
            other => Some(parse_hhmm(other).ok_or_else(syntax)?),
        };
        if end == Some(start) {
            return Err(WindowError::Empty(spec.to_owned()));
        }
        let tz = TimeZone::get(tz_name).map_err(|source| WindowError::TimeZone {
            name: tz_name.to_owned(),
            source,
        })?;
        Ok(Self {
            start,
            end,
            tz,
            spec: spec.to_owned(),
        })
    }

    /// Whether the store's local clock reads a time inside the window at `now`.
    pub fn contains(&self, now: Timestamp) -> bool {
        let local = self.tz.to_datetime(now).time();
        match self.end {
            None => local >= self.start,
            Some(end) if self.start < end => self.start <= local && local < end,
            // The window crosses midnight.
            Some(end) => local >= self.start || local < end,
        }
    }

    /// The first instant at or after `now` when the window is open.
    pub fn next_open(&self, now: Timestamp) -> Timestamp {
        if self.contains(now) {
            return now;
        }
        self.first_candidate(now, Some(self.start), |t| self.contains(t))
            .unwrap_or(now)
    }

    /// When the window that is open at `now` closes, or `None` if it is closed at `now`.
    pub fn closes_at(&self, now: Timestamp) -> Option<Timestamp> {
        if !self.contains(now) {
            return None;
        }
        self.first_candidate(now, self.end, |t| !self.contains(t))
    }

    /// The earliest instant after `now` at which the local clock reaches `time` (`None` is
    /// midnight at the end of the day) on some day close to `now`, and `accept` holds.
    ///
    /// Daylight-saving changes make a local time happen twice (a fold: both instants are
    /// candidates) or never (a gap: the clock reaches it at the transition itself).
    fn first_candidate(
        &self,
        now: Timestamp,
        time: Option<Time>,
        accept: impl Fn(Timestamp) -> bool,
    ) -> Option<Timestamp> {
        let today = self.tz.to_datetime(now).date();
        let mut candidates = Vec::new();
        for offset in -1..=2_i64 {
            let Ok(day) = today.checked_add(offset.days()) else {
                continue;
            };
            let (day, time) = match time {
                Some(t) => (day, t),
                None => match day.tomorrow() {
                    Ok(next) => (next, Time::midnight()),
                    Err(_) => continue,
                },
            };
            self.instants_of(day, time, &mut candidates);
        }
        candidates.sort();
        candidates.into_iter().find(|&t| t > now && accept(t))
    }

    fn instants_of(&self, day: Date, time: Time, out: &mut Vec<Timestamp>) {
        let local = day.to_datetime(time);
        let ambiguous = self.tz.to_ambiguous_timestamp(local);
        match ambiguous.offset() {
            AmbiguousOffset::Unambiguous { offset } => {
                out.extend(offset.to_timestamp(local).ok());
            }
            AmbiguousOffset::Fold { before, after } => {
                out.extend(before.to_timestamp(local).ok());
                out.extend(after.to_timestamp(local).ok());
            }
            AmbiguousOffset::Gap { before, .. } => {
                // The clock skips `time`: it first reads a later time at the transition,
                // which is the last transition at or before `local` read with the old offset.
                if let Ok(late) = before.to_timestamp(local) {
                    out.extend(self.tz.preceding(late).next().map(|tr| tr.timestamp()));
                }
            }
        }
    }
}

impl fmt::Debug for TrainingWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrainingWindow")
            .field("spec", &self.spec)
            .field("tz", &self.tz.iana_name())
            .finish()
    }
}

impl fmt::Display for TrainingWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.spec, self.tz.iana_name().unwrap_or("?"))
    }
}

fn parse_hhmm(s: &str) -> Option<Time> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h = i8::from_str(h).ok()?;
    let m = i8::from_str(m).ok()?;
    Time::new(h, m, 0, 0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("test timestamp")
    }

    fn chicago(spec: &str) -> TrainingWindow {
        TrainingWindow::new(spec, "America/Chicago").expect("valid window")
    }

    #[test]
    fn window_is_judged_on_the_local_clock() {
        let w = chicago("01:00-04:00");
        // 2026-06-10 is CDT (UTC-5): 01:00 local is 06:00Z.
        assert!(!w.contains(at("2026-06-10T05:59:59Z")));
        assert!(w.contains(at("2026-06-10T06:00:00Z")));
        assert!(w.contains(at("2026-06-10T08:59:59Z")));
        assert!(!w.contains(at("2026-06-10T09:00:00Z")));
    }

    #[test]
    fn window_across_midnight_is_open_on_both_sides() {
        let w = chicago("22:00-02:00");
        // January is CST (UTC-6): 22:00 local is 04:00Z the next day.
        assert!(w.contains(at("2026-01-15T04:30:00Z"))); // 22:30
        assert!(w.contains(at("2026-01-15T07:30:00Z"))); // 01:30
        assert!(!w.contains(at("2026-01-15T08:00:00Z"))); // 02:00
        assert_eq!(
            w.next_open(at("2026-01-15T12:00:00Z")),
            at("2026-01-16T04:00:00Z")
        );
        assert_eq!(
            w.closes_at(at("2026-01-15T04:30:00Z")),
            Some(at("2026-01-15T08:00:00Z"))
        );
    }

    #[test]
    fn spring_forward_shortens_the_window() {
        // 2026-03-08 02:00 CST the clocks jump to 03:00 CDT (08:00Z).
        let w = chicago("01:00-04:00");
        let opens = w.next_open(at("2026-03-08T00:00:00Z"));
        assert_eq!(opens, at("2026-03-08T07:00:00Z")); // 01:00 CST
        let closes = w.closes_at(opens).expect("open");
        assert_eq!(closes, at("2026-03-08T09:00:00Z")); // 04:00 CDT
        assert_eq!((closes - opens).as_hours(), 2);
    }

    #[test]
    fn fall_back_lengthens_the_window() {
        // 2026-11-01 02:00 CDT the clocks go back to 01:00 CST (07:00Z).
        let w = chicago("01:00-04:00");
        let opens = w.next_open(at("2026-11-01T00:00:00Z"));
        assert_eq!(opens, at("2026-11-01T06:00:00Z")); // first 01:00, CDT
        let closes = w.closes_at(opens).expect("open");
        assert_eq!(closes, at("2026-11-01T10:00:00Z")); // 04:00 CST
        assert_eq!((closes - opens).as_hours(), 4);
        // The repeated hour is inside the window both times.
        assert!(w.contains(at("2026-11-01T06:30:00Z")));
        assert!(w.contains(at("2026-11-01T07:30:00Z")));
    }

    #[test]
    fn window_starting_in_the_skipped_hour_opens_at_the_transition() {
        let w = chicago("02:15-03:30");
        let opens = w.next_open(at("2026-03-08T05:00:00Z"));
        // 02:15 never happens on 2026-03-08; at 08:00Z the clock reads 03:00, inside.
        assert_eq!(opens, at("2026-03-08T08:00:00Z"));
        assert_eq!(w.closes_at(opens), Some(at("2026-03-08T08:30:00Z")));
    }

    #[test]
    fn window_wholly_in_the_skipped_hour_waits_for_the_next_day() {
        let w = chicago("02:10-02:40");
        let opens = w.next_open(at("2026-03-08T05:00:00Z"));
        assert_eq!(opens, at("2026-03-09T07:10:00Z")); // 02:10 CDT on 03-09
    }

    #[test]
    fn window_to_end_of_day_closes_at_local_midnight() {
        let w = chicago("20:00-24:00");
        let now = at("2026-06-10T02:00:00Z"); // 21:00 CDT on 06-09
        assert!(w.contains(now));
        assert_eq!(w.closes_at(now), Some(at("2026-06-10T05:00:00Z")));
    }

    #[test]
    fn rejects_malformed_windows_and_zones() {
        for bad in [
            "1:00-4:00",
            "01:00",
            "25:00-04:00",
            "01:00-01:60",
            "aa:bb-cc:dd",
        ] {
            let err = TrainingWindow::new(bad, "UTC").expect_err(bad);
            assert!(matches!(err, WindowError::Syntax(_)), "{bad}: {err}");
        }
        assert!(matches!(
            TrainingWindow::new("03:00-03:00", "UTC"),
            Err(WindowError::Empty(_))
        ));
        let err = TrainingWindow::new("01:00-04:00", "Mars/Olympus").expect_err("zone");
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
    }
}
