//! The one way a chat changes: [`ChatService::mutate`]. Its closure edits
//! the chat under the state lock and says what the edit amounts to
//! ([`Edit::changed`], [`Edit::stored`], [`Edit::shown`]); the funnel then
//! bumps the version, marks the chat for the next write, brings the counts
//! up to date and publishes `chat.updated` — still under the lock, so
//! events come in the order of the changes — and writes `chats.db` when
//! [`Persist`] says. Loading the chats at start, creating a chat and
//! removing a deleted one (adding and removing slots) are the only other
//! writers of the registry.

use std::ops::{Deref, DerefMut};

use super::{ChatError, ChatService, Slot};
use crate::util::now_ts;

/// When a change that stored something is written to `chats.db`. A change
/// that stored nothing (only `interrupting`, or nothing at all) writes
/// nothing; each call site names the mode it would need if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Persist {
    /// Before `mutate` returns, a failure returned: the caller answers a
    /// client, and what a 2xx acknowledged must survive a `kill -9`.
    Await,
    /// Before `mutate` returns, a failure only logged (not returned): the
    /// runner must have the change on disk before it goes on (a message it
    /// took off the queue, a new provider session id) and has nobody to
    /// tell.
    AwaitLogged,
    /// In a background task: the runner goes on without waiting for the
    /// fsync. Writes stay ordered (the persist lock) and shutdown writes the
    /// final state after any in flight.
    Background,
}

/// A chat being changed inside [`ChatService::mutate`]: its slot (record
/// and live facts, through `Deref`) and what the closure declared.
pub(super) struct Edit<'a> {
    slot: &'a mut Slot,
    /// A stored field changed: bump the version and write the chat.
    stored: bool,
    /// Something clients see changed: publish `chat.updated`.
    shown: bool,
}

impl Edit<'_> {
    /// The chat changed as stored and as clients see it: `updatedAt` is
    /// stamped now, the chat written and `chat.updated` published.
    pub(super) fn changed(&mut self) {
        self.changed_at(now_ts());
    }

    /// [`changed`](Self::changed) stamped with `ts` (a turn's end stamps
    /// `updatedAt` and `lastTurn.finishedAt` alike).
    pub(super) fn changed_at(&mut self, ts: String) {
        self.slot.rec.updated_at = ts;
        self.stored = true;
        self.shown = true;
    }

    /// Only stored fields no client sees changed (the running turn's
    /// process group): written, neither stamped nor published.
    pub(super) fn stored(&mut self) {
        self.stored = true;
    }

    /// Only a live fact clients see changed (`interrupting`), nothing
    /// stored: `chat.updated` is published, nothing is written.
    pub(super) fn shown(&mut self) {
        self.shown = true;
    }
}

impl Deref for Edit<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        self.slot
    }
}

impl DerefMut for Edit<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        self.slot
    }
}

impl ChatService {
    /// Change chat `id` (also one being deleted; a closure that must not
    /// touch those checks `deleting`). `f` runs under the state lock and
    /// declares through [`Edit`] what it changed; events it publishes itself
    /// come before the `chat.updated`. A chat being deleted gets no
    /// `chat.updated`: clients were told it is gone. A closure that returns
    /// an error must have changed nothing; the error is returned as is, and
    /// [`ChatError::NotFound`] when there is no such chat.
    pub(super) async fn mutate<R>(
        &self,
        id: &str,
        persist: Persist,
        f: impl FnOnce(&mut Edit<'_>) -> Result<R, ChatError>,
    ) -> Result<R, ChatError> {
        let (out, stored) = self.apply(id, f)?;
        if stored {
            match persist {
                Persist::Await => self.persist().await?,
                Persist::AwaitLogged => self.persist_logged().await,
                Persist::Background => self.persist_in_background(),
            }
        }
        Ok(out)
    }

    /// The locked part of [`mutate`](Self::mutate); returns whether the
    /// change stored something.
    fn apply<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Edit<'_>) -> Result<R, ChatError>,
    ) -> Result<(R, bool), ChatError> {
        let mut st = self.state();
        let Some(slot) = st.chats.get_mut(id) else {
            return Err(ChatError::NotFound(id.to_owned()));
        };
        let mut edit = Edit {
            slot,
            stored: false,
            shown: false,
        };
        let out = f(&mut edit)?;
        let Edit {
            slot,
            stored,
            shown,
        } = edit;
        if shown && !slot.deleting {
            self.publish_updated(slot);
        }
        if stored {
            st.touch(id);
        } else {
            // Counts can change without a write: a delete hides the chat
            // and drops its queue before its row goes.
            st.recount(id);
        }
        Ok((out, stored))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;
    use crate::chats::{ChatDeps, NewChat};
    use crate::config::Config;
    use crate::events::bus::Published;
    use crate::events::{EventBus, SubscriptionItem};

    /// The events published after id `after`.
    async fn events_since(bus: &EventBus, after: u64) -> Vec<Arc<Published>> {
        let n = (bus.last_id() - after) as usize;
        let mut sub = bus.subscribe_internal(Some(after));
        let mut events = Vec::new();
        while events.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                Ok(Some(SubscriptionItem::Event(e))) => events.push(e),
                other => panic!("no event after {events:?}: {other:?}"),
            }
        }
        events
    }

    async fn kinds_since(bus: &EventBus, after: u64) -> Vec<String> {
        let events = events_since(bus, after).await;
        events.iter().map(|e| e.kind.clone()).collect()
    }

    /// What each declaration costs: a version bump (a write) and the
    /// `chat.updated` events it publishes, exactly once each.
    #[tokio::test]
    async fn each_change_is_bumped_written_and_published_as_declared() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("workspaces")).unwrap();
        let config = Arc::new(Config::for_home(home.path(), "s"));
        let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
        let svc = ChatService::new(config, bus.clone(), ChatDeps::standalone()).unwrap();
        let id = svc
            .create(NewChat {
                provider: "claude".into(),
                ..NewChat::default()
            })
            .await
            .unwrap()
            .id;
        let version = || svc.state().version;
        // Apply `f` to the chat: (version bumps, events, updatedAt changed).
        let change = |persist, f: fn(&mut Edit<'_>)| {
            let (svc, id, bus) = (svc.clone(), id.clone(), bus.clone());
            async move {
                let (v, ev) = (svc.state().version, bus.last_id());
                let before = svc.state().chats[&id].rec.updated_at.clone();
                tokio::time::sleep(Duration::from_millis(2)).await;
                svc.mutate(&id, persist, |c| {
                    f(c);
                    Ok(())
                })
                .await
                .unwrap();
                let after = svc.state().chats[&id].rec.updated_at.clone();
                let bumps = svc.state().version - v;
                (bumps, kinds_since(&bus, ev).await, before != after)
            }
        };

        // The chat changed: stamped, bumped, published once (stamp
        // included) and committed before `mutate` returned.
        let got = change(Persist::Await, |c| {
            c.rec.title = "renamed".into();
            c.changed();
        })
        .await;
        assert_eq!(got, (1, vec!["chat.updated".to_owned()], true));
        assert_eq!(*svc.inner.persisted.lock().await, version());
        let chat = svc.get(&id).unwrap();
        let published = events_since(&bus, bus.last_id() - 1).await;
        let json: serde_json::Value = serde_json::from_str(published[0].json()).unwrap();
        assert_eq!(json["payload"]["chat"]["title"], "renamed");
        assert_eq!(
            json["payload"]["chat"]["updatedAt"],
            chat.updated_at.as_str()
        );

        // Stored only: bumped, not stamped, not published.
        let got = change(Persist::Background, |c| c.stored()).await;
        assert_eq!(got, (1, vec![], false));
        // Shown only: published, not bumped.
        let got = change(Persist::Await, |c| {
            c.interrupting = Some("user");
            c.shown();
        })
        .await;
        assert_eq!(got, (0, vec!["chat.updated".to_owned()], false));
        // Nothing declared: nothing happens.
        let got = change(Persist::Await, |_| {}).await;
        assert_eq!(got, (0, vec![], false));

        // A failing closure's error comes back; no such chat: NotFound.
        let (v, ev) = (version(), bus.last_id());
        let err = svc.mutate(&id, Persist::Await, |_| -> Result<(), _> {
            Err(ChatError::QueueFull { max: 1 })
        });
        assert!(matches!(err.await, Err(ChatError::QueueFull { max: 1 })));
        let missing = svc.mutate("c_missing", Persist::Await, |_| Ok(()));
        assert!(matches!(missing.await, Err(ChatError::NotFound(_))));
        assert_eq!((version(), bus.last_id()), (v, ev));

        // Counts follow every change, stored or not; a chat being deleted
        // is still written but no longer published.
        assert_eq!(svc.counts().total, 1);
        let got = change(Persist::Await, |c| c.deleting = true).await;
        assert_eq!((got, svc.counts().total), ((0, vec![], false), 0));
        let got = change(Persist::Await, |c| c.changed()).await;
        assert_eq!(got, (1, vec![], true));
        assert!(svc.get(&id).is_err(), "a chat being deleted is not shown");
        svc.shutdown().await;
    }
}
