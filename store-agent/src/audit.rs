//! The store's audit log: one append-only, hash-chained JSON line per event.
//!
//! Each line is a JSON object whose last member is `"hash"`, the SHA-256 of the previous
//! line's hash followed by every byte of this line before `,"hash"`. Each line also names
//! the previous hash in `"prev"` and its position in `"seq"`. Changing, inserting or
//! deleting any line therefore breaks the chain at that line, and [`verify`] names it.
//! Dropping lines from the end is not detectable from the file alone; the last hash goes
//! out with each upload so that the chain can be anchored outside the store.
//!
//! Lines never hold a secret or a raw update: only digests, counts, parameters and ids.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash a chain starts from.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the store did, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The store took part in a round.
    RoundJoined {
        /// The round.
        round: u64,
        /// The model version it trained from.
        model_version: u64,
        /// SHA-256 of that model's blob.
        model_sha256: String,
    },
    /// The store contributed the moments of its rows to a federated-statistics round.
    StatisticsJoined {
        /// The round.
        round: u64,
        /// Training rows whose count, sums and sums of squares it contributed.
        rows: u64,
    },
    /// The store declined a round, and why.
    RoundDeclined {
        /// The round.
        round: u64,
        /// Why, as shown to the operator.
        reason: String,
    },
    /// The data the store trained on, as a digest of the loaded rows.
    DatasetSnapshot {
        /// The round.
        round: u64,
        /// SHA-256 over the loaded, redacted columns.
        sha256: String,
        /// Rows loaded.
        rows: u64,
    },
    /// The training configuration, as a digest of the task config.
    TrainingConfig {
        /// The round.
        round: u64,
        /// SHA-256 of the canonical task config.
        sha256: String,
    },
    /// Differential-privacy parameters and the store's epsilon after the round.
    Privacy {
        /// The round.
        round: u64,
        /// Noise multiplier.
        noise_multiplier: f64,
        /// Clipping norm.
        clip_norm: f64,
        /// Steps run.
        steps: u64,
        /// Sampling rate.
        sample_rate: f64,
        /// Epsilon spent so far at `delta`.
        epsilon_after: f64,
        /// The delta of `epsilon_after`.
        delta: f64,
    },
    /// A commitment (SHA-256) to the seed that drew this round's noise.
    NoiseSeedCommitment {
        /// The round.
        round: u64,
        /// SHA-256 of the seed.
        commitment: String,
    },
    /// An update built and queued.
    UpdateQueued {
        /// The round.
        round: u64,
        /// SHA-256 of the update as sent.
        update_sha256: String,
        /// Its size in bytes.
        bytes: u64,
    },
    /// A PoP acknowledged the update: it holds it durably until core settles the round.
    UpdateHeld {
        /// The round.
        round: u64,
        /// SHA-256 of the update.
        update_sha256: String,
        /// The PoP's metro, from its receipt.
        pop: String,
    },
    /// Core found the update missing after the PoPs' forwarding time (the PoP that held
    /// it is gone) and the store sent it again, marked re-sent.
    UpdateResent {
        /// The round.
        round: u64,
        /// SHA-256 of the update.
        update_sha256: String,
    },
    /// Core confirmed the round's outcome for the update.
    UploadConfirmed {
        /// The round.
        round: u64,
        /// SHA-256 of the update.
        update_sha256: String,
        /// Whether the round included it (false: it closed without it).
        included: bool,
    },
}

/// Why the audit log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// File I/O failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The existing log does not verify, so appending would extend a broken chain.
    #[error("audit log {path} is broken at line {}: {}", .broken.line, .broken.reason)]
    Broken {
        /// The log file.
        path: PathBuf,
        /// The first broken link.
        broken: BrokenLink,
    },
}

/// The first line at which a chain fails to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// The result of checking a whole log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Lines that verified.
    pub lines: u64,
    /// The hash of the last good line ([`GENESIS`] for an empty log).
    pub head: String,
}

/// An open audit log, ready to append.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    seq: u64,
    head: String,
}

#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time: &'a str,
    prev: &'a str,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

const HASH_MEMBER: &str = ",\"hash\":\"";

impl AuditLog {
    /// Opens (or creates) the log at `path`, verifying the chain already there.
    ///
    /// A final line torn by a crash mid-append (no newline) is removed first: it was never
    /// reported as written.
    ///
    /// # Errors
    ///
    /// [`AuditError::Broken`] if the existing chain does not verify, else I/O errors.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let io_err = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err)?;
        drop_torn_tail(&mut file).map_err(io_err)?;
        file.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let verified = match verify_reader(BufReader::new(&file)).map_err(io_err)? {
            Ok(v) => v,
            Err(broken) => {
                return Err(AuditError::Broken {
                    path: path.to_owned(),
                    broken,
                });
            }
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            seq: verified.lines,
            head: verified.head,
        })
    }

    /// Appends one event stamped with `time` (RFC 3339) and syncs it to disk.
    ///
    /// # Errors
    ///
    /// I/O errors; the log is unchanged or ends in a torn line that the next open drops.
    pub fn append(&mut self, time: &str, event: &AuditEvent) -> Result<String, AuditError> {
        let body = Body {
            seq: self.seq + 1,
            time,
            prev: &self.head,
            event,
        };
        let json = serde_json::to_string(&body).expect("audit events always serialise");
        // `json` ends with the object's closing brace; the hash member goes before it.
        let prefix = &json[..json.len() - 1];
        let hash = link_hash(&self.head, prefix);
        let line = format!("{prefix}{HASH_MEMBER}{hash}\"}}\n");

        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        self.seq += 1;
        self.head = hash.clone();
        Ok(hash)
    }

    /// The hash of the last line, which anchors the chain.
    pub fn head(&self) -> &str {
        &self.head
    }
}

/// Checks the chain of the log at `path`, returning the first broken link if any.
///
/// # Errors
///
/// I/O errors reading the file.
pub fn verify(path: &Path) -> Result<Result<Verified, BrokenLink>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    verify_reader(BufReader::new(file)).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })
}

fn verify_reader(reader: impl BufRead) -> io::Result<Result<Verified, BrokenLink>> {
    let mut head = GENESIS.to_owned();
    let mut lines = 0_u64;
    for (index, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        let number = index as u64 + 1;
        if let Err(reason) = check_line(&line, number, &head) {
            return Ok(Err(BrokenLink {
                line: number,
                reason,
            }));
        }
        head = String::from_utf8_lossy(&line[line.len() - 66..line.len() - 2]).into_owned();
        lines = number;
    }
    Ok(Ok(Verified { lines, head }))
}

/// Checks one line against the previous hash; on success the line's hash is its bytes
/// `[len-66, len-2)`.
fn check_line(line: &[u8], number: u64, prev: &str) -> Result<(), String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let split = text
        .len()
        .checked_sub(HASH_MEMBER.len() + 64 + 2)
        .filter(|&at| text.is_char_boundary(at) && text[at..].starts_with(HASH_MEMBER))
        .ok_or("does not end with a hash member")?;
    let (prefix, rest) = text.split_at(split);
    // Check the closing bytes before slicing, so that a multi-byte character there is a
    // broken line rather than a slice off a character boundary.
    let stated = rest
        .strip_suffix("\"}")
        .and_then(|r| r.strip_prefix(HASH_MEMBER))
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("does not end with a hash member")?;

    #[derive(Deserialize)]
    struct Head {
        seq: u64,
        prev: String,
    }
    let head: Head = serde_json::from_str(&format!("{prefix}}}"))
        .map_err(|err| format!("not an audit record: {err}"))?;
    if head.seq != number {
        return Err(format!("seq is {}, expected {number}", head.seq));
    }
    if head.prev != prev {
        return Err("prev does not match the hash of the line before".into());
    }
    if link_hash(prev, prefix) != stated {
        return Err("hash does not match the line's contents".into());
    }
    Ok(())
}

fn link_hash(prev: &str, prefix: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(prefix.as_bytes());
    hex::encode(h.finalize())
}

fn drop_torn_tail(file: &mut File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0_u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the end of the last complete line and cut there.
    let mut keep = len;
    let mut buf = vec![0_u8; 64 * 1024];
    while keep > 0 {
        let start = keep.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(keep - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            keep = start + pos as u64 + 1;
            break;
        }
        keep = start;
    }
    tracing::warn!(audit.torn_bytes = len - keep, "dropping a torn audit line");
    file.set_len(keep)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(round: u64) -> AuditEvent {
        AuditEvent::RoundDeclined {
            round,
            reason: "outside training window".into(),
        }
    }

    fn write_log(path: &Path, n: u64) {
        let mut log = AuditLog::open(path).expect("open");
        for round in 1..=n {
            log.append("2026-12-03T01:00:00Z", &event(round))
                .expect("append");
        }
    }

    #[test]
    fn chain_of_appends_verifies_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3);
        write_log(&path, 2);
        let verified = verify(&path).expect("read").expect("chain verifies");
        assert_eq!(verified.lines, 5);
        let text = std::fs::read_to_string(&path).expect("read");
        let last: serde_json::Value =
            serde_json::from_str(text.lines().last().expect("lines")).expect("json");
        assert_eq!(last["hash"], verified.head);
        assert_eq!(last["event"], "round_declined");
        assert_eq!(last["seq"], 5);
    }

    #[test]
    fn editing_any_line_is_reported_at_that_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 6);
        let original = std::fs::read_to_string(&path).expect("read");
        for target in 0..6 {
            let edited: Vec<String> = original
                .lines()
                .enumerate()
                .map(|(i, l)| {
                    if i == target {
                        l.replacen("outside training window", "inside training window", 1)
                    } else {
                        l.to_owned()
                    }
                })
                .collect();
            std::fs::write(&path, edited.join("\n") + "\n").expect("write");
            let broken = verify(&path).expect("read").expect_err("must break");
            assert_eq!(broken.line, target as u64 + 1, "{}", broken.reason);
        }
    }

    #[test]
    fn deleting_a_line_breaks_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 4);
        let text = std::fs::read_to_string(&path).expect("read");
        let kept: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| l)
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").expect("write");
        let broken = verify(&path).expect("read").expect_err("must break");
        assert_eq!(broken.line, 2);
    }

    #[test]
    fn torn_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 2);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(br#"{"seq":3,"time":"2026"#).expect("write");
        drop(f);
        let mut log = AuditLog::open(&path).expect("torn tail dropped");
        log.append("2026-12-03T02:00:00Z", &event(9))
            .expect("append");
        assert_eq!(verify(&path).expect("read").expect("verifies").lines, 3);
    }

    #[test]
    fn multibyte_garbage_in_the_hash_is_a_broken_line_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 1);
        let mut text = std::fs::read_to_string(&path).expect("read");
        // `€` is three bytes: it straddles the position where the closing `"}` should be.
        text.push_str(&format!("{{\"seq\":2,\"hash\":\"{}€\n", "a".repeat(63)));
        std::fs::write(&path, text).expect("write");
        let broken = verify(&path).expect("read").expect_err("must break");
        assert_eq!(broken.line, 2, "{}", broken.reason);
    }

    #[test]
    fn refuses_to_extend_a_broken_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 2);
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace("\"seq\":1", "\"seq\":7");
        std::fs::write(&path, text).expect("write");
        let err = AuditLog::open(&path).expect_err("broken");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
