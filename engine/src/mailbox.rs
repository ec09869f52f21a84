//! A connection's mailbox: the deliveries routed to it (bounded, for backpressure) and
//! the broker's control requests, in one small shared cell.
//!
//! Why not tokio's mpsc channels: a tokio channel allocates a block of 32 slots when it
//! is created and keeps it for its whole life, and a connection had two channels. With
//! thousands of idle connections that was kilobytes each for messages that never come.
//! This mailbox allocates nothing while it is empty and gives its storage back once it
//! is drained and its receiver waits again; only a small buffer that is in steady use
//! stays until [`Sender::release_idle_storage`] finds it unused (see [`KEEP_SLOTS`]).
//!
//! Semantics (those of a bounded tokio channel, which the broker relies on):
//! - at most `capacity` deliveries are queued or reserved at once; [`Sender::try_reserve`]
//!   is all or nothing, and a [`Permit`] holds its slot until it sends or is dropped;
//! - [`Sender::send`] waits for room (the caller bounds the wait), waiters are served
//!   in arrival order, and it fails once the receiver closed the deliveries or is gone;
//! - [`Receiver::recv`] yields `None` once the deliveries are closed (or every sender
//!   is gone), empty, and no reserved slot is outstanding;
//! - control requests are unbounded and open until the receiver is dropped;
//!   [`Receiver::recv_control`] yields `None` once every sender is gone;
//! - a [`WeakSender`] does not keep the mailbox open: it upgrades only while some
//!   sender lives.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Keeps `cx`'s waker in `slot` to be woken later, cloning it only when it is not the
/// one there already (the usual case: the same task waits again).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// Storage of at most this many deliveries outlives a drain. A subscriber that keeps
/// up takes each delivery as it comes, so its queue empties after every one; freeing
/// the storage then would cost an allocation per delivery. A queue consumer gets its
/// deliveries in batches of up to its window (a hundred or more): freeing that storage
/// on every drain cost a regrowth (several reallocations, the last ones large) per
/// batch, a few percent of the broker's CPU per queue message. Kept storage is at most
/// 256 deliveries of 64 bytes (16 KiB) on a connection in steady use, and it goes back
/// once the connection is idle for a period; larger storage (a burst) is freed at once.
pub const KEEP_SLOTS: usize = 256;

struct Shared<T, C> {
    state: Mutex<State<T, C>>,
    /// Senders waiting for room.
    room: Notify,
    capacity: usize,
}

struct State<T, C> {
    items: VecDeque<T>,
    control: VecDeque<C>,
    /// Slots held by permits not yet used.
    reserved: usize,
    /// Senders (strong handles) alive.
    senders: usize,
    /// Senders waiting in [`Sender::send`].
    waiting: usize,
    /// The receiver refuses further deliveries.
    closed: bool,
    /// The receiver is gone: nothing is taken any more.
    gone: bool,
    /// The receiver kept its drained storage since the last
    /// [`Sender::release_idle_storage`].
    kept: bool,
    item_waker: Option<Waker>,
    control_waker: Option<Waker>,
}

impl<T, C> State<T, C> {
    fn has_room(&self, capacity: usize) -> bool {
        self.items.len() + self.reserved < capacity
    }

    fn refuses(&self) -> bool {
        self.closed || self.gone
    }
}

/// A new mailbox holding at most `capacity` deliveries.
pub fn mailbox<T, C>(capacity: usize) -> (Sender<T, C>, Receiver<T, C>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            control: VecDeque::new(),
            reserved: 0,
            senders: 1,
            waiting: 0,
            closed: false,
            gone: false,
            kept: false,
            item_waker: None,
            control_waker: None,
        }),
        room: Notify::new(),
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Why a delivery was not taken at once.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The mailbox is at capacity.
    Full(T),
    /// The receiver closed the deliveries or is gone.
    Closed(T),
}

impl<T> TrySendError<T> {
    /// The delivery that was not taken.
    pub fn into_inner(self) -> T {
        match self {
            TrySendError::Full(item) | TrySendError::Closed(item) => item,
        }
    }
}

/// The sending side; cloning it makes another sender.
pub struct Sender<T, C> {
    shared: Arc<Shared<T, C>>,
}

/// A sender that does not keep the mailbox open (see [`WeakSender::upgrade`]).
pub struct WeakSender<T, C> {
    shared: Arc<Shared<T, C>>,
}

/// A reserved slot: [`Permit::send`] cannot fail for want of room.
pub struct Permit<'a, T, C> {
    shared: &'a Shared<T, C>,
}

/// The receiving side, owned by the connection task. Deliveries and control requests
/// can be awaited side by side (both take `&self`); there is one receiver.
pub struct Receiver<T, C> {
    shared: Arc<Shared<T, C>>,
}

impl<T, C> Sender<T, C> {
    /// Reserves a slot, if there is room and the receiver still takes deliveries.
    pub fn try_reserve(&self) -> Option<Permit<'_, T, C>> {
        let mut state = self.shared.state.lock();
        if state.refuses() || !state.has_room(self.shared.capacity) {
            return None;
        }
        state.reserved += 1;
        Some(Permit {
            shared: &self.shared,
        })
    }

    /// Queues a delivery if there is room now (one lock, where reserving and then
    /// sending takes two).
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.shared.try_send(item, false, false)
    }

    /// Queues a delivery, waiting for room. Fails (giving the delivery back) once the
    /// receiver closed the deliveries or is gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let mut item = item;
        loop {
            // Registered before looking, so room made after the look wakes us.
            let notified = self.shared.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match self.shared.try_send(item, true, false) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => item = back,
            }
            // `try_send` counted us as waiting; uncount however this wait ends.
            let _waiting = Waiting(&self.shared);
            notified.await;
        }
    }

    /// Hands a control request to the connection. Fails (giving it back) once the
    /// receiver is gone.
    pub fn control(&self, request: C) -> Result<(), C> {
        let waker = {
            let mut state = self.shared.state.lock();
            if state.gone {
                return Err(request);
            }
            state.control.push_back(request);
            state.control_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Frees drained storage kept by the receiver unless it was used since the last
    /// call: called periodically, this gives an idle connection's buffer back within
    /// two periods of its last delivery.
    pub fn release_idle_storage(&self) {
        let freed = {
            let mut state = self.shared.state.lock();
            if std::mem::take(&mut state.kept) || !state.items.is_empty() {
                return;
            }
            std::mem::take(&mut state.items)
        };
        drop(freed);
    }

    /// A handle that does not keep the mailbox open.
    pub fn downgrade(&self) -> WeakSender<T, C> {
        WeakSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T, C> Shared<T, C> {
    /// With `wait`, a full mailbox counts the caller as waiting for room; with `weak`
    /// (a [`WeakSender`]), it is closed also when no sender is alive.
    fn try_send(&self, item: T, wait: bool, weak: bool) -> Result<(), TrySendError<T>> {
        let waker = {
            let mut state = self.state.lock();
            if state.refuses() || (weak && state.senders == 0) {
                return Err(TrySendError::Closed(item));
            }
            if !state.has_room(self.capacity) {
                if wait {
                    state.waiting += 1;
                }
                return Err(TrySendError::Full(item));
            }
            state.items.push_back(item);
            state.item_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Called with the lock held whenever a slot frees up.
    fn room_made(&self, state: &State<T, C>) {
        if state.waiting > 0 {
            self.room.notify_one();
        }
    }
}

/// A sender counted in [`State::waiting`] while it exists.
struct Waiting<'a, T, C>(&'a Shared<T, C>);

impl<T, C> Drop for Waiting<'_, T, C> {
    fn drop(&mut self) {
        self.0.state.lock().waiting -= 1;
    }
}

impl<T, C> Clone for Sender<T, C> {
    fn clone(&self) -> Self {
        self.shared.state.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T, C> Drop for Sender<T, C> {
    fn drop(&mut self) {
        let wakers = {
            let mut state = self.shared.state.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            (state.item_waker.take(), state.control_waker.take())
        };
        // The last sender: a waiting receiver must see the end.
        for w in [wakers.0, wakers.1].into_iter().flatten() {
            w.wake();
        }
    }
}

impl<T, C> fmt::Debug for Sender<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl<T, C> WeakSender<T, C> {
    /// Queues a delivery if some sender is alive, the receiver takes deliveries and
    /// there is room now: what upgrading, [`Sender::try_send`] and dropping the
    /// upgraded sender do, under one lock instead of three (a `$queue/` sink offers
    /// every delivery this way).
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.shared.try_send(item, false, true)
    }

    /// A sender, unless every sender is gone already.
    pub fn upgrade(&self) -> Option<Sender<T, C>> {
        let mut state = self.shared.state.lock();
        if state.senders == 0 {
            return None;
        }
        state.senders += 1;
        Some(Sender {
            shared: self.shared.clone(),
        })
    }
}

impl<T, C> Clone for WeakSender<T, C> {
    fn clone(&self) -> Self {
        WeakSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T, C> Permit<'_, T, C> {
    /// Queues a delivery in the reserved slot. If the receiver is gone meanwhile, the
    /// delivery is dropped, as a queued one would have been.
    pub fn send(self, item: T) {
        let shared = self.shared;
        std::mem::forget(self);
        let (waker, dropped) = {
            let mut state = shared.state.lock();
            state.reserved -= 1;
            if state.gone {
                (None, Some(item))
            } else {
                state.items.push_back(item);
                (state.item_waker.take(), None)
            }
        };
        drop(dropped);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T, C> Drop for Permit<'_, T, C> {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.state.lock();
            state.reserved -= 1;
            self.shared.room_made(&state);
            // A closed, drained receiver waits for outstanding permits only.
            state.item_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T, C> Receiver<T, C> {
    /// The next delivery; `None` once no more can come (see the module notes).
    pub fn recv(&self) -> impl std::future::Future<Output = Option<T>> + '_ {
        // Not an `async fn`, which would store `self` twice in every waiting task.
        poll_fn(|cx| self.poll_recv(cx))
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.state.lock();
        if let Some(item) = state.items.pop_front() {
            self.shared.room_made(&state);
            return Poll::Ready(Some(item));
        }
        if (state.closed || state.senders == 0) && state.reserved == 0 {
            return Poll::Ready(None);
        }
        // Drained: the storage goes back to the allocator until deliveries come again,
        // unless it is small enough to keep while in use (`release_idle_storage` frees
        // it once the connection has gone idle).
        if state.items.capacity() > KEEP_SLOTS {
            state.items = VecDeque::new();
        } else if state.items.capacity() > 0 {
            state.kept = true;
        }
        register(&mut state.item_waker, cx);
        Poll::Pending
    }

    /// The next delivery if one is queued now.
    pub fn try_recv(&self) -> Option<T> {
        let mut state = self.shared.state.lock();
        let item = state.items.pop_front();
        if item.is_some() {
            self.shared.room_made(&state);
        }
        item
    }

    /// The next control request; `None` once every sender is gone and none is left.
    pub fn recv_control(&self) -> impl std::future::Future<Output = Option<C>> + '_ {
        poll_fn(|cx| self.poll_control(cx))
    }

    fn poll_control(&self, cx: &mut Context<'_>) -> Poll<Option<C>> {
        let mut state = self.shared.state.lock();
        if let Some(request) = state.control.pop_front() {
            if state.control.is_empty() {
                state.control = VecDeque::new();
            }
            return Poll::Ready(Some(request));
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        register(&mut state.control_waker, cx);
        Poll::Pending
    }

    /// Refuses further deliveries; those queued (and those whose slot is already
    /// reserved) can still be received. Control requests still come.
    pub fn close(&mut self) {
        self.shared.state.lock().closed = true;
        // Senders waiting for room fail now.
        self.shared.room.notify_waiters();
    }
}

impl<T, C> Drop for Receiver<T, C> {
    fn drop(&mut self) {
        let (items, control) = {
            let mut state = self.shared.state.lock();
            state.gone = true;
            state.item_waker = None;
            state.control_waker = None;
            (
                std::mem::take(&mut state.items),
                std::mem::take(&mut state.control),
            )
        };
        self.shared.room.notify_waiters();
        // Dropped outside the lock: a delivery's drop may be arbitrary work.
        drop((items, control));
    }
}

impl<T, C> fmt::Debug for Receiver<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    type Mb = (Sender<u32, &'static str>, Receiver<u32, &'static str>);

    fn new(capacity: usize) -> Mb {
        mailbox(capacity)
    }

    #[test]
    fn try_reserve_counts_queued_and_reserved_slots_against_capacity() {
        let (tx, rx) = new(2);
        let permit = tx.try_reserve().expect("room");
        tx.try_send(1).expect("room");
        assert!(tx.try_reserve().is_none(), "full: one queued, one reserved");
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        drop(permit);
        tx.try_reserve()
            .expect("an unused permit gives its slot back")
            .send(3);
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn send_waits_for_room_and_blocked_senders_go_in_order() {
        let (tx, rx) = new(1);
        tx.try_send(0).expect("room");
        let mut waiters = Vec::new();
        for i in 1..=3 {
            let tx = tx.clone();
            waiters.push(tokio::spawn(async move { tx.send(i).await }));
            // Let each one register before the next.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rx.recv().await.expect("a delivery"));
        }
        assert_eq!(got, vec![0, 1, 2, 3]);
        for w in waiters {
            assert_eq!(w.await.expect("joined"), Ok(()));
        }
    }

    #[tokio::test]
    async fn a_timed_out_waiter_does_not_swallow_the_room_of_the_next() {
        let (tx, rx) = new(1);
        tx.try_send(0).expect("room");
        let impatient = tokio::time::timeout(Duration::from_millis(10), tx.send(1)).await;
        assert!(impatient.is_err(), "no room within the wait");
        let tx2 = tx.clone();
        let patient = tokio::spawn(async move { tx2.send(2).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(rx.recv().await, Some(0));
        let sent = tokio::time::timeout(Duration::from_secs(5), patient).await;
        assert_eq!(sent.expect("woken").expect("joined"), Ok(()));
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn close_fails_waiting_senders_but_keeps_what_was_queued() {
        let (tx, mut rx) = new(1);
        tx.try_send(7).expect("room");
        let tx2 = tx.clone();
        let blocked = tokio::spawn(async move { tx2.send(8).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        rx.close();
        assert_eq!(blocked.await.expect("joined"), Err(8));
        assert!(tx.try_reserve().is_none());
        assert_eq!(tx.try_send(9), Err(TrySendError::Closed(9)));
        assert_eq!(rx.recv().await, Some(7));
        assert_eq!(rx.recv().await, None, "closed and drained");
        // Control requests still reach a closed (but living) receiver.
        tx.control("kick").expect("receiver alive");
        assert_eq!(rx.recv_control().await, Some("kick"));
    }

    #[tokio::test]
    async fn a_closed_receiver_still_gets_what_an_outstanding_permit_sends() {
        let (tx, mut rx) = new(4);
        let permit = tx.try_reserve().expect("room");
        rx.close();
        let recv = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx.recv().await)
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        permit.send(5);
        let (first, then) = recv.await.expect("joined");
        assert_eq!((first, then), (Some(5), None));
    }

    #[tokio::test]
    async fn the_receiver_sees_the_end_when_the_last_sender_goes() {
        let (tx, rx) = new(4);
        let weak = tx.downgrade();
        let tx2 = tx.clone();
        tx2.try_send(1).expect("room");
        drop(tx);
        assert!(weak.upgrade().is_some(), "one sender still alive");
        let waiting = tokio::spawn(async move {
            let a = rx.recv().await;
            let b = rx.recv().await;
            let c = rx.recv_control().await;
            (a, b, c)
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(tx2);
        assert_eq!(waiting.await.expect("joined"), (Some(1), None, None));
        assert!(weak.upgrade().is_none(), "no sender left to upgrade to");
    }

    #[tokio::test]
    async fn a_dropped_receiver_refuses_everything() {
        let (tx, rx) = new(4);
        let permit = tx.try_reserve().expect("room");
        drop(rx);
        permit.send(1);
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
        assert_eq!(tx.send(3).await, Err(3));
        assert_eq!(tx.control("kick"), Err("kick"));
    }

    #[test]
    fn a_weak_sender_sends_only_while_a_sender_lives() {
        let (tx, rx) = new(1);
        let weak = tx.downgrade();
        assert_eq!(weak.try_send(1), Ok(()));
        assert_eq!(weak.try_send(2), Err(TrySendError::Full(2)));
        assert_eq!(rx.try_recv(), Some(1));
        drop(tx);
        assert_eq!(weak.try_send(3), Err(TrySendError::Closed(3)));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn storage_is_given_back_once_drained() {
        let (tx, rx) = new(4 * KEEP_SLOTS);
        for i in 0..2 * KEEP_SLOTS as u32 {
            tx.try_send(i).expect("room");
        }
        while rx.try_recv().is_some() {}
        // The receiver waits again after a burst: nothing may stay allocated.
        let waited = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await;
        assert!(waited.is_err());
        assert_eq!(rx.shared.state.lock().items.capacity(), 0);
        tx.control("a").expect("alive");
        assert_eq!(rx.recv_control().await, Some("a"));
        assert_eq!(rx.shared.state.lock().control.capacity(), 0);
    }

    #[tokio::test]
    async fn a_small_buffer_stays_while_used_and_goes_once_idle() {
        let (tx, rx) = new(100);
        let mut cx = Context::from_waker(Waker::noop());
        let mut deliver_one = |i| {
            tx.try_send(i).expect("room");
            assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(i)));
            // Drained: the receiver waits again.
            assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        };
        deliver_one(1);
        let kept = rx.shared.state.lock().items.capacity();
        assert!(kept > 0, "a caught-up receiver keeps its small buffer");
        tx.release_idle_storage();
        deliver_one(2);
        tx.release_idle_storage();
        assert_eq!(
            rx.shared.state.lock().items.capacity(),
            kept,
            "used since the last release: kept"
        );
        tx.release_idle_storage();
        assert_eq!(
            rx.shared.state.lock().items.capacity(),
            0,
            "unused for a whole period: freed"
        );
        deliver_one(3);
    }
}
