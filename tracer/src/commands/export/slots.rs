//! `--max-connections`: the connections served at once. A connection beyond the limit
//! takes the place of the oldest one that has not yet made an authorised request
//! (a client that connected and sent nothing, or only requests that were refused);
//! when every connection has, the new one is closed at once. So a flood of idle or
//! refused connections never shuts out a scrape, and what the exporter holds stays
//! bounded.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    rc::Rc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

/// How often, at most, a full table is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

pub struct Slots {
    max: usize,
    inner: RefCell<Inner>,
}

struct Inner {
    next: u64,
    /// The open connections by age (their number), each with whether it has made an
    /// authorised request, and the sender that closes it when dropped.
    open: BTreeMap<u64, (bool, oneshot::Sender<()>)>,
    /// Connections closed for room since the last log line, and when that was.
    displaced: u64,
    refused: u64,
    logged: Option<Instant>,
}

/// A connection's place; it leaves the table when dropped.
pub struct Slot {
    id: u64,
    slots: Rc<Slots>,
}

/// Resolves (with an error) when the connection must close to make room for a newer one.
pub type Closed = oneshot::Receiver<()>;

impl Slots {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(Self {
            max,
            inner: RefCell::new(Inner {
                next: 0,
                open: BTreeMap::new(),
                displaced: 0,
                refused: 0,
                logged: None,
            }),
        })
    }

    /// A place for a new connection, and what says when to close it; `None` when it
    /// must be closed at once.
    pub fn admit(self: &Rc<Self>) -> Option<(Slot, Closed)> {
        let mut inner = self.inner.borrow_mut();
        if inner.open.len() >= self.max {
            let oldest_unproven = inner
                .open
                .iter()
                .find(|(_, (proven, _))| !proven)
                .map(|(&id, _)| id);
            match oldest_unproven {
                // Dropping its sender closes it.
                Some(id) => {
                    inner.open.remove(&id);
                    inner.displaced += 1;
                    inner.log(self.max);
                }
                None => {
                    inner.refused += 1;
                    inner.log(self.max);
                    return None;
                }
            }
        }
        let id = inner.next;
        inner.next += 1;
        let (close, closed) = oneshot::channel();
        inner.open.insert(id, (false, close));
        Some((
            Slot {
                id,
                slots: Rc::clone(self),
            },
            closed,
        ))
    }

    /// The connections open now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.borrow().open.len()
    }
}

impl Inner {
    /// One line when the table first fills, then at most one a minute while it stays
    /// full.
    fn log(&mut self, max: usize) {
        if self.logged.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        log::warn!(
            "--max-connections {max} reached: {} idle or unauthorised connections closed for \
             newer ones, {} new ones refused (all the others had made authorised requests){}",
            self.displaced,
            self.refused,
            if self.logged.is_some() {
                " in the last minute"
            } else {
                ""
            }
        );
        self.logged = Some(Instant::now());
        self.displaced = 0;
        self.refused = 0;
    }
}

impl Slot {
    /// The connection made an authorised request: it is no longer the first to go.
    pub fn proven(&self) {
        if let Some(entry) = self.slots.inner.borrow_mut().open.get_mut(&self.id) {
            entry.0 = true;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.inner.borrow_mut().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unproven_connection_makes_room() {
        let slots = Slots::new(3);
        let (a, _) = slots.admit().unwrap_or_else(|| panic!("a"));
        let (b, mut b_closed) = slots.admit().unwrap_or_else(|| panic!("b"));
        let (c, _) = slots.admit().unwrap_or_else(|| panic!("c"));
        a.proven();
        // Full: b (the oldest not proven) is closed for d.
        let (d, mut d_closed) = slots.admit().unwrap_or_else(|| panic!("d"));
        assert_eq!(
            b_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(slots.len(), 3);
        c.proven();
        d.proven();
        assert_eq!(
            d_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        // Every connection is proven: a new one is refused.
        assert!(slots.admit().is_none());
        drop(a);
        assert!(slots.admit().is_some());
        // b's drop, after it was displaced, frees nothing twice.
        drop(b);
        assert_eq!(slots.len(), 2);
    }
}
