//! Provider sessions in the test process (`tests/providers*.rs`): a prompt,
//! a turn run to its end, events read until one of interest.

use std::time::Duration;

use replicas_engine::providers::{
    items, ItemKind, ProviderEvent, ProviderSession, RunningTurn, TurnInput, TurnResult,
};

pub fn prompt(text: &str) -> TurnInput {
    TurnInput {
        prompt: text.into(),
        ..TurnInput::default()
    }
}

/// Every event of a turn up to and including `Finished` (checked to be last
/// and unique: the channel closes right after it), within `timeout`.
pub async fn drain(turn: &mut RunningTurn, timeout: Duration) -> (Vec<ProviderEvent>, TurnResult) {
    let mut events = Vec::new();
    let collect = async {
        while let Some(ev) = turn.events.recv().await {
            events.push(ev);
        }
    };
    tokio::time::timeout(timeout, collect)
        .await
        .expect("turn did not end");
    let finished: Vec<&TurnResult> = events
        .iter()
        .filter_map(|e| match e {
            ProviderEvent::Finished(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 1, "exactly one Finished: {events:?}");
    let result = finished[0].clone();
    assert!(
        matches!(events.last(), Some(ProviderEvent::Finished(_))),
        "Finished is last"
    );
    (events, result)
}

/// Start a turn with `input` and [`drain`] it.
pub async fn run(
    s: &mut ProviderSession,
    input: TurnInput,
    timeout: Duration,
) -> (RunningTurn, Vec<ProviderEvent>, TurnResult) {
    let mut turn = s.start_turn(input).await.unwrap();
    let (events, result) = drain(&mut turn, timeout).await;
    (turn, events, result)
}

/// Read a running turn's events (each within `timeout`) until `done` holds
/// for one; returns them all. Fails if the turn finishes first.
pub async fn read_until(
    turn: &mut RunningTurn,
    timeout: Duration,
    mut done: impl FnMut(&ProviderEvent) -> bool,
) -> Vec<ProviderEvent> {
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(timeout, turn.events.recv())
            .await
            .expect("no event in time")
            .expect("turn ended early");
        assert!(
            !matches!(ev, ProviderEvent::Finished(_)),
            "finished early: {ev:?}"
        );
        let stop = done(&ev);
        seen.push(ev);
        if stop {
            return seen;
        }
    }
}

/// The assistant's text of a turn.
pub fn answer(events: &[ProviderEvent]) -> String {
    items(events)
        .into_iter()
        .filter(|i| i.kind == ItemKind::AssistantMessage)
        .filter_map(|i| i.text.clone())
        .collect::<Vec<_>>()
        .join("\n")
}
