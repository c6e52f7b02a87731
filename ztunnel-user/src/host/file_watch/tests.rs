//! The watch against real files: a replacement by rename, a write in place, and a burst of
//! writes each reported, the burst once; and a directory's wanted entries.

use super::*;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Long enough for inotify and `SETTLE` on a loaded machine.
const WAIT: Duration = Duration::from_secs(5);

async fn next(changes: &mut mpsc::UnboundedReceiver<()>) {
    timeout(WAIT, changes.recv())
        .await
        .expect("a change reported in time")
        .expect("the watch is running");
}

#[tokio::test]
async fn replacements_and_writes_in_place_are_reported_and_a_burst_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root-cert.pem");
    std::fs::write(&path, "one").unwrap();
    let (report, mut changes) = mpsc::unbounded_channel();
    let watched = path.clone();
    let watch = tokio::spawn(async move {
        let unwatched = |err: &WatchError| panic!("{err}");
        on_changes(&watched, unwatched, || {
            let _ = report.send(());
            None
        })
        .await;
    });
    // The first call, at once.
    next(&mut changes).await;

    let partial = dir.path().join("partial");
    std::fs::write(&partial, "two").unwrap();
    std::fs::rename(&partial, &path).unwrap();
    next(&mut changes).await;

    std::fs::write(&path, "three").unwrap();
    next(&mut changes).await;

    for round in 0..10 {
        std::fs::write(&path, format!("burst {round}")).unwrap();
    }
    next(&mut changes).await;
    assert!(
        timeout(SETTLE_AT_MOST * 2, changes.recv()).await.is_err(),
        "a burst was reported more than once"
    );
    // Another file of the directory is no change of this one.
    std::fs::write(dir.path().join("other"), "x").unwrap();
    assert!(timeout(SETTLE_AT_MOST * 2, changes.recv()).await.is_err());
    watch.abort();
}

#[tokio::test]
async fn a_directory_reports_its_wanted_entries_created_replaced_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (report, mut changes) = mpsc::unbounded_channel();
    let watched = dir.path().to_owned();
    let wanted = |name: &OsStr| name.to_string_lossy().ends_with(".conflist");
    let watch = tokio::spawn(async move {
        let unwatched = |err: &WatchError| panic!("{err}");
        on_directory_changes(&watched, wanted, unwatched, || {
            let _ = report.send(());
            None
        })
        .await;
    });
    next(&mut changes).await;

    let path = dir.path().join("10-a.conflist");
    std::fs::write(&path, "one").unwrap();
    next(&mut changes).await;
    let partial = dir.path().join("10-a.conflist.tmp");
    std::fs::write(&partial, "two").unwrap();
    std::fs::rename(&partial, &path).unwrap();
    next(&mut changes).await;
    std::fs::write(dir.path().join("05-b.conflist"), "three").unwrap();
    next(&mut changes).await;
    std::fs::remove_file(&path).unwrap();
    next(&mut changes).await;

    // Entries it does not want are no change.
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    assert!(timeout(SETTLE_AT_MOST * 2, changes.recv()).await.is_err());
    watch.abort();
}
