//! Kills a store agent's upload loop at every step of the queue's life and restarts it:
//! exactly one copy of each update must reach core, byte for byte, and nothing stays queued.
//!
//! The agent runs in a child process (this test binary, re-run on its ignored entry point)
//! whose fail points abort the process, which loses everything not yet on disk, as
//! `kill -9` does.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use fedmesh_store_agent::queue::{EntryState, UpdateMeta, UploadQueue};
use sha2::{Digest, Sha256};

const ROUNDS: u64 = 3;
const STORE: &str = "0042";

/// A stand-in for core behind the PoP: it keeps one update per store per round, answers a
/// re-send of the same bytes with the same receipt, and logs every arrival.
struct FakeCore {
    dir: PathBuf,
}

impl FakeCore {
    fn accept(&self, round: u64, payload: &[u8]) -> Result<String, String> {
        let digest = hex::encode(Sha256::digest(payload));
        let mut log = fs::read_to_string(self.dir.join("arrivals")).unwrap_or_default();
        log.push_str(&format!("{round} {digest}\n"));
        fs::write(self.dir.join("arrivals"), log).map_err(|e| e.to_string())?;
        let slot = self.dir.join(format!("r{round}-{STORE}"));
        match fs::read(&slot) {
            Ok(existing) if existing == payload => Ok(digest),
            Ok(_) => Err(format!(
                "round {round}: a second, different update from {STORE}"
            )),
            Err(_) => {
                fs::write(&slot, payload).map_err(|e| e.to_string())?;
                Ok(digest)
            }
        }
    }

    fn has(&self, round: u64) -> bool {
        self.dir.join(format!("r{round}-{STORE}")).exists()
    }
}

/// The update the agent builds for a round. Training is not deterministic in general, so
/// each build differs: a rebuilt (rather than recovered) update would show up at core as a
/// second, different update for the round.
fn build_update(round: u64) -> Vec<u8> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut payload = format!("update for round {round}, build {nonce}\n").into_bytes();
    payload.resize(4096 + round as usize, round as u8);
    payload
}

/// The agent's upload loop, as the child process runs it.
fn agent(state: &Path, core: &FakeCore) {
    let queue = UploadQueue::open(state).expect("open queue");
    for round in 1..=ROUNDS {
        let pending = queue.list().expect("list");
        let entry = match pending.into_iter().find(|u| u.meta.round == round) {
            Some(entry) => entry,
            // Core settled this round already and the entry is gone.
            None if core.has(round) => continue,
            None => {
                let meta = UpdateMeta {
                    round,
                    model_version: round - 1,
                };
                queue.enqueue(meta, &build_update(round)).expect("enqueue")
            }
        };
        if entry.state == EntryState::Queued {
            let payload = queue.payload(&entry.id).expect("payload");
            let receipt = core.accept(round, &payload).expect("core accepts");
            fail::fail_point!("agent.after_send");
            queue.mark_sent(&entry.id, &receipt).expect("mark sent");
        }
        // Core has the update: the round closes with it included.
        queue.settle(&entry.id, true).expect("settle");
    }
}

#[test]
#[ignore = "entry point of the child process that the crash tests start"]
fn child_agent() {
    let Ok(dir) = std::env::var("FEDMESH_TEST_CHILD_DIR") else {
        return;
    };
    std::panic::set_hook(Box::new(|_| std::process::abort()));
    let _scenario = fail::FailScenario::setup();
    let dir = PathBuf::from(dir);
    let core = FakeCore {
        dir: dir.join("core"),
    };
    agent(&dir.join("state"), &core);
}

fn run_child(dir: &Path, failpoints: Option<&str>) -> bool {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--exact",
        "child_agent",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("FEDMESH_TEST_CHILD_DIR", dir)
    .env_remove("FAILPOINTS");
    if let Some(fp) = failpoints {
        cmd.env("FAILPOINTS", fp);
    }
    cmd.output().expect("run child").status.success()
}

#[test]
fn crash_at_any_step_then_restart_delivers_each_update_exactly_once() {
    // Each fail point, hit after `skip` earlier passes, aborts the agent mid-step.
    let points = [
        ("queue.write.before_rename", 0..9),
        ("queue.enqueue.after_commit", 0..3),
        ("agent.after_send", 0..3),
        ("queue.settle.after_mark", 0..3),
        ("queue.settle.after_remove_update", 0..3),
    ];
    let mut crashes = 0;
    for (point, skips) in points {
        for skip in skips {
            let tmp = tempfile::tempdir().expect("tempdir");
            fs::create_dir_all(tmp.path().join("core")).expect("core dir");
            let spec = format!("{point}={skip}*off->panic");
            let crashed = !run_child(tmp.path(), Some(&spec));
            crashes += usize::from(crashed);
            assert!(run_child(tmp.path(), None), "restart after {spec} failed");

            let core = FakeCore {
                dir: tmp.path().join("core"),
            };
            for round in 1..=ROUNDS {
                assert!(core.has(round), "{spec}: round {round} never reached core");
            }
            let arrivals = fs::read_to_string(core.dir.join("arrivals")).expect("arrivals");
            for round in 1..=ROUNDS {
                let digests: std::collections::BTreeSet<&str> = arrivals
                    .lines()
                    .filter_map(|l| l.split_once(' '))
                    .filter(|(r, _)| *r == round.to_string())
                    .map(|(_, d)| d)
                    .collect();
                assert_eq!(digests.len(), 1, "{spec}: round {round} got {digests:?}");
            }
            let left = UploadQueue::open(&tmp.path().join("state")).expect("reopen");
            assert!(
                left.list().expect("list").is_empty(),
                "{spec}: queue not drained"
            );
            let stray: Vec<_> = fs::read_dir(tmp.path().join("state"))
                .expect("state dir")
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            assert!(stray.is_empty(), "{spec}: files left behind: {stray:?}");
        }
    }
    // Every fail point above is on the path of three rounds, so each run must crash.
    assert_eq!(crashes, 21, "some fail points were never reached");
}

#[test]
fn queued_update_is_readable_and_private() {
    use std::os::unix::fs::PermissionsExt;

    let tmp = tempfile::tempdir().expect("tempdir");
    let queue = UploadQueue::open(tmp.path()).expect("open");
    let meta = UpdateMeta {
        round: 7,
        model_version: 3,
    };
    let entry = queue
        .enqueue(meta.clone(), b"masked update")
        .expect("enqueue");
    assert_eq!(queue.payload(&entry.id).expect("payload"), b"masked update");
    assert_eq!(queue.enqueue(meta, b"masked update").expect("again"), entry);
    let path = tmp.path().join(format!("{}.update", entry.id));
    let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A flipped byte is caught, not sent.
    let mut bytes = fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).expect("write");
    let err = queue.payload(&entry.id).expect_err("corrupt");
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
}

#[test]
fn a_damaged_entry_is_set_aside_and_the_rest_of_the_queue_still_opens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let queue = UploadQueue::open(tmp.path()).expect("open");
    let meta = |round| UpdateMeta {
        round,
        model_version: 1,
    };
    let good = queue.enqueue(meta(1), b"first update").expect("enqueue");
    let bad = queue.enqueue(meta(2), b"second update").expect("enqueue");
    let bad_path = tmp.path().join(format!("{}.update", bad.id));
    fs::write(&bad_path, b"FMQUEUE1 torn").expect("damage");

    let reopened = UploadQueue::open(tmp.path()).expect("a damaged file must not block the queue");
    let left: Vec<String> = reopened
        .list()
        .expect("list")
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(left, vec![good.id]);
    assert!(
        tmp.path()
            .join(format!("{}.update.corrupt", bad.id))
            .exists()
    );
}
