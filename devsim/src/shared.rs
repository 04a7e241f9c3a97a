//! Shared device state: one value that a simulator's front-end reads on every request and
//! that tests and scenarios mutate while it keeps serving. Mutations notify watchers (the
//! VM-12 publishes at once on any change).

use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A device state shared between its front-end and whoever drives it.
#[derive(Debug)]
pub struct Shared<S> {
    tx: Arc<watch::Sender<S>>,
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self {
            tx: Arc::clone(&self.tx),
        }
    }
}

impl<S: Clone> Shared<S> {
    pub fn new(state: S) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(state)),
        }
    }

    /// A copy of the current state.
    pub fn get(&self) -> S {
        self.tx.borrow().clone()
    }

    /// Reads the current state without copying it.
    pub fn with<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.tx.borrow())
    }

    /// Mutates the state and notifies watchers.
    pub fn update<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        let mut out = None;
        self.tx.send_modify(|s| out = Some(f(s)));
        match out {
            Some(r) => r,
            None => unreachable!("send_modify always runs its closure"),
        }
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<S> {
        self.tx.subscribe()
    }
}

/// Stops a simulator's tasks when dropped.
#[derive(Debug)]
pub struct Stopper {
    token: CancellationToken,
    _guard: DropGuard,
}

impl Stopper {
    pub fn new() -> Self {
        let token = CancellationToken::new();
        let guard = token.clone().drop_guard();
        Self {
            token,
            _guard: guard,
        }
    }

    /// A token that the simulator's tasks watch.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stops the simulator now.
    pub fn stop(&self) {
        self.token.cancel();
    }
}

impl Default for Stopper {
    fn default() -> Self {
        Self::new()
    }
}
