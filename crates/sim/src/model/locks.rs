//! Postgres's session advisory locks, as the protocol uses them: exclusive,
//! re-entrant (a second lock by the holder only counts), released all at once when
//! the session ends, whoever ends it (the worker, a crash, `idle_session_timeout`, a
//! terminated backend). A shared probe answers whether another session holds a key.

use std::collections::BTreeMap;

use crate::time::Millis;

/// A two-int advisory key, as `taskpod_worker::lock` builds them.
pub type Key = (i32, i32);

/// One lock session (a dedicated connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u32);

/// A call on a session that has ended: the caller's connection is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionGone;

#[derive(Clone, Debug)]
struct Session {
    opened_at: Millis,
    last_active: Millis,
    ended_at: Option<Millis>,
}

/// Every session and every held key.
#[derive(Clone, Debug, Default)]
pub struct Locks {
    sessions: BTreeMap<SessionId, Session>,
    /// Key -> holder and how many times it locked the key.
    holders: BTreeMap<Key, (SessionId, u32)>,
    next: u32,
}

impl Locks {
    /// Opens a session.
    pub fn open(&mut self, now: Millis) -> SessionId {
        self.next += 1;
        let id = SessionId(self.next);
        self.sessions.insert(
            id,
            Session {
                opened_at: now,
                last_active: now,
                ended_at: None,
            },
        );
        id
    }

    /// Ends a session and releases everything it held. Returns the keys released
    /// (empty when it had already ended).
    pub fn end(&mut self, s: SessionId, now: Millis) -> Vec<Key> {
        let Some(session) = self.sessions.get_mut(&s) else {
            return Vec::new();
        };
        if session.ended_at.is_some() {
            return Vec::new();
        }
        session.ended_at = Some(now);
        let released: Vec<Key> = self
            .holders
            .iter()
            .filter(|(_, (h, _))| *h == s)
            .map(|(k, _)| *k)
            .collect();
        for k in &released {
            self.holders.remove(k);
        }
        released
    }

    pub fn alive(&self, s: SessionId) -> bool {
        self.sessions.get(&s).is_some_and(|x| x.ended_at.is_none())
    }

    /// When the session ended, if it did.
    pub fn ended_at(&self, s: SessionId) -> Option<Millis> {
        self.sessions.get(&s).and_then(|x| x.ended_at)
    }

    pub fn opened_at(&self, s: SessionId) -> Option<Millis> {
        self.sessions.get(&s).map(|x| x.opened_at)
    }

    fn active(&mut self, s: SessionId, now: Millis) -> Result<(), SessionGone> {
        match self.sessions.get_mut(&s) {
            Some(x) if x.ended_at.is_none() => {
                x.last_active = x.last_active.max(now);
                Ok(())
            }
            _ => Err(SessionGone),
        }
    }

    /// A ping: the session answers, and is not idle any more.
    ///
    /// # Errors
    /// When the session has ended.
    pub fn ping(&mut self, s: SessionId, now: Millis) -> Result<(), SessionGone> {
        self.active(s, now)
    }

    /// `pg_try_advisory_lock`: true when the key was free or already this session's
    /// (then it is held once more, as Postgres counts it).
    ///
    /// # Errors
    /// When the session has ended.
    pub fn try_lock(&mut self, s: SessionId, key: Key, now: Millis) -> Result<bool, SessionGone> {
        self.active(s, now)?;
        match self.holders.get_mut(&key) {
            Some((h, n)) if *h == s => {
                *n += 1;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => {
                self.holders.insert(key, (s, 1));
                Ok(true)
            }
        }
    }

    /// `pg_advisory_unlock`: false when this session did not hold the key.
    ///
    /// # Errors
    /// When the session has ended.
    pub fn unlock(&mut self, s: SessionId, key: Key, now: Millis) -> Result<bool, SessionGone> {
        self.active(s, now)?;
        match self.holders.get_mut(&key) {
            Some((h, n)) if *h == s => {
                *n -= 1;
                if *n == 0 {
                    self.holders.remove(&key);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The probe `LockSession::is_held_elsewhere` runs: whether a session other than
    /// `s` holds `key`.
    ///
    /// # Errors
    /// When the session has ended.
    pub fn held_elsewhere(
        &mut self,
        s: SessionId,
        key: Key,
        now: Millis,
    ) -> Result<bool, SessionGone> {
        self.active(s, now)?;
        Ok(self.holders.get(&key).is_some_and(|(h, _)| *h != s))
    }

    /// Who holds `key`, as the server sees it.
    pub fn holder(&self, key: Key) -> Option<SessionId> {
        self.holders.get(&key).map(|(h, _)| *h)
    }

    /// The sessions idle for longer than `timeout` at `now`: what
    /// `idle_session_timeout` ends.
    pub fn idle_past(&self, now: Millis, timeout: Millis) -> Vec<SessionId> {
        self.sessions
            .iter()
            .filter(|(_, x)| x.ended_at.is_none() && now.saturating_sub(x.last_active) > timeout)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_exclusive_reentrant_and_die_with_their_session() {
        let mut l = Locks::default();
        let (a, b) = (l.open(0), l.open(0));
        assert_eq!(l.try_lock(a, (1, 1), 0), Ok(true));
        assert_eq!(l.try_lock(b, (1, 1), 0), Ok(false));
        assert_eq!(l.held_elsewhere(b, (1, 1), 0), Ok(true));
        assert_eq!(l.held_elsewhere(a, (1, 1), 0), Ok(false));
        assert_eq!(l.try_lock(a, (1, 1), 0), Ok(true));
        assert_eq!(l.unlock(a, (1, 1), 0), Ok(true));
        assert_eq!(l.holder((1, 1)), Some(a), "held twice, unlocked once");
        assert_eq!(l.end(a, 5), vec![(1, 1)]);
        assert_eq!(l.try_lock(a, (1, 1), 6), Err(SessionGone));
        assert_eq!(l.try_lock(b, (1, 1), 6), Ok(true));
    }

    #[test]
    fn idle_sessions_are_found() {
        let mut l = Locks::default();
        let a = l.open(0);
        let b = l.open(0);
        l.ping(b, 900).ok();
        assert_eq!(l.idle_past(1001, 1000), vec![a]);
    }
}
