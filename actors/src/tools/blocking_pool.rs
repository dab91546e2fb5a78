//! A pool of threads for blocking calls that are usually short and sometimes slow: the
//! file tools' create, write, fsync and rename.
//!
//! tokio's blocking pool starts a thread whenever none is idle, keeps as many as calls ever
//! ran at once, and wakes an idle one for every call. For `file.write` on a fast disk (tens
//! of µs a call, thousands a second) that is a futex wake and a cold thread per call; capped
//! at 2 threads, the node ran 10 % more tasks/s on 2 cores (docs/PERFORMANCE.md). A fixed
//! small pool would serialize fsyncs on a slow disk, though, where many in parallel share
//! one journal commit. So this pool keeps `min` threads and adds one, up to `max`, when a
//! queued call has waited `grow_after` and every thread is in a call that has itself run
//! for over `grow_after`: slow calls, not a busy CPU (a queue wait alone grew the pool to
//! 52 threads under load on 2 cores, and lost the gain). Each waiting call checks again
//! every `grow_after` until it starts, so no call is stranded behind blocked threads.
//! Threads above `min` leave after `keep_alive` idle.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// Why a call did not return a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("no thread could be started for the call: {0}")]
    Unavailable(String),
    #[error("the call panicked")]
    Panicked,
}

pub struct BlockingPool {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    name: &'static str,
    min: usize,
    max: usize,
    grow_after: Duration,
    keep_alive: Duration,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    threads: usize,
    /// Threads waiting for work.
    idle: usize,
    /// Wake-ups sent and not yet taken: an idle thread is woken once, not once per call.
    notified: usize,
    /// Per thread slot: when its current call started (`None`: between calls or free).
    calls: Vec<Option<Instant>>,
    /// Per thread slot: taken by a live thread.
    slots: Vec<bool>,
    closed: bool,
}

impl BlockingPool {
    /// Threads are started when calls come: `min` of them (at least 1) as soon as
    /// calls find none idle; more, up to `max`, while calls wait behind threads that are
    /// all stuck in calls over `grow_after`.
    pub fn new(
        name: &'static str,
        min: usize,
        max: usize,
        grow_after: Duration,
        keep_alive: Duration,
    ) -> Self {
        let max = max.max(1);
        BlockingPool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                name,
                min: min.clamp(1, max),
                max,
                grow_after,
                keep_alive,
            }),
        }
    }

    /// Runs `f` on one of the pool's threads and returns what it returned.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let started = Arc::new(AtomicBool::new(false));
        let running = started.clone();
        let has_thread = self.submit(Box::new(move || {
            running.store(true, Ordering::Relaxed);
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        }))?;
        // A thread free for it (or started for it) takes it now: no growth check, and no
        // timer, whose registration and removal take tokio's one timer lock
        // (docs/PERFORMANCE.md: workers yield their core spinning on it).
        let outcome = if has_thread {
            rx.await
        } else {
            self.wait_growing(&started, &mut rx).await
        };
        match outcome {
            Ok(Ok(value)) => Ok(value),
            // The sender is dropped unsent only if the job was dropped unrun: the pool
            // was closed with it queued. Both read as a call that did not complete.
            Ok(Err(_)) | Err(_) => Err(PoolError::Panicked),
        }
    }

    /// Waits for a call queued behind busy threads, adding a thread every `grow_after`
    /// it has not started while all of them are stuck in slow calls.
    async fn wait_growing<T>(
        &self,
        started: &AtomicBool,
        rx: &mut tokio::sync::oneshot::Receiver<T>,
    ) -> Result<T, tokio::sync::oneshot::error::RecvError> {
        loop {
            match tokio::time::timeout(self.shared.grow_after, &mut *rx).await {
                Ok(outcome) => return outcome,
                Err(_) if !started.load(Ordering::Relaxed) => self.grow(),
                Err(_) => {}
            }
        }
    }

    /// Threads the pool holds now (for tests and the benchmark's notes).
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Queues `job`; `true` if a thread is there for it: an idle one woken for it (every
    /// call queued before it has one too), or one started for it.
    fn submit(&self, job: Job) -> Result<bool, PoolError> {
        let shared = &self.shared;
        let mut state = shared.lock();
        state.queue.push_back(job);
        if state.idle > state.notified {
            state.notified += 1;
            shared.work.notify_one();
            return Ok(true);
        }
        if state.threads < shared.min {
            match shared.add_thread(&mut state) {
                Ok(()) => return Ok(true),
                // With no thread at all, nobody would ever take the call.
                Err(e) if state.threads == 0 => {
                    state.queue.pop_back();
                    return Err(PoolError::Unavailable(e.to_string()));
                }
                Err(_) => {}
            }
        }
        Ok(false)
    }

    /// A call waited in the queue: one more thread if every thread is stuck in a slow
    /// call (none idle) and fewer than `max` are up.
    fn grow(&self) {
        let shared = &self.shared;
        let mut state = shared.lock();
        let slow = state
            .calls
            .iter()
            .flatten()
            .filter(|started| started.elapsed() >= shared.grow_after)
            .count();
        if !state.queue.is_empty()
            && state.idle <= state.notified
            && slow >= state.threads
            && state.threads < shared.max
        {
            // On failure the threads it has take the call when they are free.
            let _ = shared.add_thread(&mut state);
        }
    }
}

impl Drop for BlockingPool {
    /// Threads finish what is queued, then leave.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }
}

impl Shared {
    fn add_thread(self: &Arc<Self>, state: &mut State) -> std::io::Result<()> {
        let slot = match state.slots.iter().position(|taken| !taken) {
            Some(free) => free,
            None => {
                state.slots.push(false);
                state.calls.push(None);
                state.slots.len() - 1
            }
        };
        let worker = self.clone();
        let spawned = std::thread::Builder::new()
            .name(self.name.to_string())
            .spawn(move || worker.work(slot));
        match spawned {
            Ok(_) => {
                state.threads += 1;
                state.slots[slot] = true;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(pool = self.name, error = %e, "cannot add a thread");
                Err(e)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under the lock, so a poisoned lock only means a panic in this
        // module's own bookkeeping; the state is still consistent enough to go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn work(self: Arc<Self>, slot: usize) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queue.pop_front() {
                state.calls[slot] = Some(Instant::now());
                drop(state);
                job();
                state = self.lock();
                state.calls[slot] = None;
                continue;
            }
            if state.closed {
                break;
            }
            state.idle += 1;
            let (next, waited) = self
                .work
                .wait_timeout(state, self.keep_alive)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            state.idle -= 1;
            if state.notified > 0 {
                state.notified -= 1;
            }
            if waited.timed_out() && state.queue.is_empty() && state.threads > self.min {
                break;
            }
        }
        state.threads -= 1;
        state.slots[slot] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn returns_what_the_call_returns_and_survives_a_panic() {
        let pool = BlockingPool::new("test-pool", 1, 4, MS, Duration::from_secs(5));
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
        assert_eq!(
            pool.run(|| -> u8 { panic!("a call that panics") }).await,
            Err(PoolError::Panicked)
        );
        assert_eq!(pool.run(|| "still serving").await, Ok("still serving"));
    }

    /// Calls that block (a slow disk's fsync) get threads of their own up to `max`: eight
    /// calls that each wait for all eight complete only if they run at once, though
    /// nothing is submitted once the first two threads are blocked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_block_get_threads_up_to_max() {
        let pool = Arc::new(BlockingPool::new(
            "test-pool",
            2,
            8,
            MS,
            Duration::from_secs(5),
        ));
        let barrier = Arc::new(Barrier::new(8));
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                tokio::spawn(async move {
                    pool.run(move || {
                        barrier.wait();
                        i
                    })
                    .await
                })
            })
            .collect();
        let all = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
            .await
            .expect("eight blocking calls did not run at once");
        let mut got: Vec<usize> = all.into_iter().map(|r| r.unwrap().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        assert_eq!(pool.threads(), 8);
    }

    /// Threads above `min` leave once idle for `keep_alive`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_above_min_leave_when_idle() {
        let pool = Arc::new(BlockingPool::new("test-pool", 1, 4, MS, 50 * MS));
        let barrier = Arc::new(Barrier::new(4));
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                tokio::spawn(async move { pool.run(move || barrier.wait()).await })
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
            .await
            .expect("four blocking calls did not run at once");
        assert_eq!(pool.threads(), 4);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pool.threads() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} threads",
                pool.threads()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.run(|| 1).await, Ok(1));
    }
}
