//! Reconnecting: which ends are routine (back at once) and which back off, doubling with
//! jitter up to 15 s, for refused openings and channels that cannot be had.

use super::*;

/// After failures that grew the backoff to 80 ms: Internal in the middle of a stream waits
/// it, Unavailable (istiod going away) comes back at once; both with the versions held.
#[tokio::test(start_paused = true)]
async fn unavailable_reconnects_at_once_other_statuses_back_off() {
    let mut h = start(config(None), 0);
    refuse_three(&h);
    let mut stream = h.subscribed().await;
    stream
        .acked(response(ADDRESS, "n1", vec![a1("7")], &[]))
        .await;

    let failed = Instant::now();
    stream.fail(tonic::Status::internal("oops"));
    let mut stream = h.next_stream().await;
    let gap = h.istiod.openings().last().unwrap().at - failed;
    assert!(Duration::from_millis(40) <= gap && gap <= Duration::from_millis(81));
    let [address_request, _] = stream.initial_requests().await;
    assert_eq!(
        address_request.initial_resource_versions,
        versions(&[(&uid("a1"), "7")])
    );

    let failed = Instant::now();
    stream.fail(tonic::Status::unavailable("transport is closing"));
    let mut stream = h.next_stream().await;
    assert!(h.istiod.openings().last().unwrap().at - failed < AT_ONCE);
    let [address_request, _] = stream.initial_requests().await;
    assert_eq!(
        address_request.initial_resource_versions,
        versions(&[(&uid("a1"), "7")])
    );
    assert_eq!(
        h.xds.status().last_error.as_deref(),
        Some("the stream failed: Unavailable: transport is closing")
    );
}

/// Which ends are routine (reconnect at once): a clean end, and Unknown, Cancelled,
/// DeadlineExceeded or Unavailable in the middle of a stream; not a refused opening.
#[test]
fn routine_ends_are_a_clean_end_and_four_statuses() {
    let routine: Vec<tonic::Code> = (0..=16)
        .map(tonic::Code::from_i32)
        .filter(|code| Ended::Failed(tonic::Status::new(*code, "")).routine())
        .collect();
    assert_eq!(
        routine,
        [
            tonic::Code::Cancelled,
            tonic::Code::Unknown,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Unavailable
        ]
    );
    assert!(Ended::Closed.routine());
    assert!(!Ended::Refused(tonic::Status::unavailable("")).routine());
    assert!(!Ended::Connect("refused".into()).routine());
}

/// Openings refused with Unauthenticated: 10 ms, doubling up to 15 s, each jittered down to
/// half; once a stream ends as routine, the backoff starts over.
#[tokio::test(start_paused = true)]
async fn refused_openings_back_off_doubling_to_15_s() {
    const REFUSALS: u32 = 14;
    let mut h = start(config(None), 0);
    for _ in 0..REFUSALS {
        h.istiod
            .refuse_next(tonic::Status::unauthenticated("token expired"));
    }
    let stream = h.next_stream().await;
    let openings = h.istiod.openings();
    assert_eq!(openings.len(), REFUSALS as usize + 1);
    for (i, pair) in openings.windows(2).enumerate() {
        let due = (INITIAL_BACKOFF * 2u32.pow(i as u32)).min(MAX_BACKOFF);
        let gap = pair[1].at - pair[0].at;
        assert!(
            due / 2 <= gap && gap <= due + Duration::from_millis(1),
            "delay {i}: {gap:?} for {due:?}"
        );
    }
    let status = h.xds.status();
    assert_eq!(
        status.last_error.as_deref(),
        Some("istiod refused the stream: Unauthenticated: token expired")
    );

    // A clean end: back at once; then a refusal waits the first delay again.
    h.istiod
        .refuse_next(tonic::Status::permission_denied("not yet"));
    drop(stream);
    let _stream = h.next_stream().await;
    let openings = h.istiod.openings();
    let [.., ended, refused, open] = openings.as_slice() else {
        unreachable!()
    };
    assert!(refused.at - ended.at < AT_ONCE);
    let gap = open.at - refused.at;
    assert!(INITIAL_BACKOFF / 2 <= gap && gap <= INITIAL_BACKOFF + Duration::from_millis(1));
}

/// A channel that cannot be had is retried with the backoff too.
#[tokio::test(start_paused = true)]
async fn connect_errors_back_off() {
    let mut h = start(config(None), 3);
    let _stream = h.subscribed().await;
    let dials = h.dials();
    assert_eq!(dials.len(), 4);
    for (i, pair) in dials.windows(2).enumerate() {
        let due = INITIAL_BACKOFF * 2u32.pow(i as u32);
        let gap = pair[1] - pair[0];
        assert!(
            due / 2 <= gap && gap <= due + Duration::from_millis(1),
            "{gap:?}"
        );
    }
    assert_eq!(h.istiod.openings().len(), 1);
    assert_eq!(h.xds.status().attempts, 4);
}
