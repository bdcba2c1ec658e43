//! A state dir whose database rolls back to an earlier commit (sled reopening there after
//! corruption, or an older copy restored) never gives a snapshot version that already left the
//! process to other content: the next version continues above the version mark kept beside the
//! database, the rollback is counted, and the positions roll back with the data, so the events
//! since are applied again (nothing lost).

use std::path::Path;

use segmenter::config::Config;
use segmenter::generator::{GeneratorParams, generate, write_csv};
use segmenter::pipeline::{Pipeline, Shared};
use segmenter::replay::{ReplayOptions, replay};
use segmenter::store::VERSION_MARK_FILE;

fn config(state: &Path) -> Config {
    let mut c = Config::default();
    c.state.dir = state.to_path_buf();
    c.model.clusters = 4;
    c.replay.batch_size = 1_000;
    c
}

fn options(ratings: &Path) -> ReplayOptions {
    ReplayOptions::csv(ratings)
}

/// Copies the database's files of `from` into `to` (the version mark stays where it is).
fn copy_database(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == VERSION_MARK_FILE {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_database(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Replaces the database of `state` with the copy in `earlier`, keeping `state`'s version mark.
fn roll_back(state: &Path, earlier: &Path) {
    for entry in std::fs::read_dir(state).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == VERSION_MARK_FILE {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        } else {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    copy_database(earlier, state);
}

/// The events both tests replay: 120 users, 6,000 events, seeded.
fn stream() -> Vec<segmenter::event::RatingEvent> {
    generate(&GeneratorParams {
        users: 120,
        items: 60,
        events: 6_000,
        segments: 4,
        seed: 19,
        ..GeneratorParams::default()
    })
    .events
}

#[test]
fn a_replay_over_a_rolled_back_state_dir_continues_above_the_versions_already_given_out() {
    let dir = tempfile::tempdir().unwrap();
    let events = stream();
    let (first, second) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
    for (path, part) in [(&first, &events[..3_000]), (&second, &events[3_000..])] {
        write_csv(part, &mut std::fs::File::create(path).unwrap()).unwrap();
    }
    let (state, earlier) = (dir.path().join("state"), dir.path().join("earlier"));

    let one = replay(&config(&state), &options(&first)).unwrap();
    assert_eq!(one.snapshot.as_ref().expect("snapshot").0.version, 1);
    copy_database(&state, &earlier);
    let two = replay(&config(&state), &options(&second)).unwrap();
    let given_out = two.snapshot.as_ref().expect("snapshot").0.version;
    assert_eq!(given_out, 2);

    // The database goes back to where it was after the first file; version 2 had been handed
    // out (written to the report, served, published) meanwhile.
    roll_back(&state, &earlier);

    // Whatever source opens it, the pipeline counts the rollback.
    {
        let config = config(&state);
        let stores = config.state.open().unwrap();
        let loaded = stores.state.load_engine(config.engine_params()).unwrap();
        let shared = Shared::default();
        let pipeline = Pipeline::new(
            &config,
            segmenter::pipeline::SnapshotPolicy::service(&config),
            stores,
            loaded,
            shared.clone(),
            None,
        )
        .unwrap();
        assert_eq!(shared.metrics.state_rollbacks.get(), 1);
        assert!(
            shared
                .metrics
                .render()
                .contains("segmenter_state_rollbacks_total 1")
        );
        pipeline.finish(false).unwrap();
    }

    let again = replay(&config(&state), &options(&second)).unwrap();
    assert_eq!(
        (again.applied, again.skipped),
        (3_000, 0),
        "the positions rolled back with the data: the second file is applied again"
    );
    let (snapshot, _) = again.snapshot.as_ref().expect("snapshot");
    assert_eq!(
        snapshot.version, 3,
        "version 2 is not given to other content"
    );
    assert_eq!(snapshot.counts, two.snapshot.as_ref().unwrap().0.counts);
}

/// What reopening a damaged copy of a state dir came to.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Reopened {
    /// Refused with this message.
    Refused(String),
    /// Loaded; the next snapshot version and whether a rollback was found.
    Loaded { next: u64, rolled_back: bool },
}

#[test]
fn byte_flips_in_a_written_state_dir_are_refused_as_corrupt_or_continue_above_the_versions_given_out()
 {
    let dir = tempfile::tempdir().unwrap();
    let events = stream();
    let (ratings, state) = (dir.path().join("part.csv"), dir.path().join("state"));
    // Six replays: six commits of state and versions 1 to 6.
    for part in events.chunks(1_000) {
        write_csv(part, &mut std::fs::File::create(&ratings).unwrap()).unwrap();
        replay(&config(&state), &options(&ratings)).unwrap();
    }
    let database = std::fs::read(state.join("db")).unwrap();
    let mut outcomes = vec![];
    for round in 0..200u64 {
        let copy = dir.path().join(format!("copy{round}"));
        copy_database(&state, &copy);
        std::fs::copy(state.join(VERSION_MARK_FILE), copy.join(VERSION_MARK_FILE)).unwrap();
        // Eight bytes flipped about one place, which moves through the file round by round.
        let mut bytes = database.clone();
        let len = bytes.len();
        let at = (round * 2_654_435_761 % len as u64) as usize;
        for k in 0..8 {
            bytes[(at + k * 977) % len] ^= 0x5a;
        }
        std::fs::write(copy.join("db"), bytes).unwrap();
        let config = config(&copy);
        let reopened = config
            .state
            .open()
            .and_then(|stores| {
                let next = stores.snapshots.next_snapshot_version()?;
                let rolled_back = stores.snapshots.rollback().is_some();
                stores.state.load_engine(config.engine_params())?;
                Ok(Reopened::Loaded { next, rolled_back })
            })
            .unwrap_or_else(|e| Reopened::Refused(e.to_string()));
        outcomes.push((round, reopened));
    }
    for (round, outcome) in &outcomes {
        match outcome {
            Reopened::Refused(message) => {
                assert!(message.contains("corrupt"), "round {round}: {message}");
                assert!(
                    message.contains("restore the state dir from a backup"),
                    "round {round}: {message}"
                );
                for misleading in ["another", "disk", "writable"] {
                    assert!(!message.contains(misleading), "round {round}: {message}");
                }
            }
            Reopened::Loaded { next, .. } => {
                assert_eq!(*next, 7, "round {round}: versions 1 to 6 were given out")
            }
        }
    }
    // Over 200 places the flips reach both kinds of damage: data sled refuses to read, and data
    // it reads back at an earlier commit (the later ones dropped without an error).
    let refused = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Reopened::Refused(_)))
        .count();
    let rolled_back = outcomes
        .iter()
        .filter(|(_, o)| {
            matches!(
                o,
                Reopened::Loaded {
                    rolled_back: true,
                    ..
                }
            )
        })
        .count();
    assert!(refused > 0 && rolled_back > 0, "{outcomes:?}");
}
