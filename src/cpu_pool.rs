//! Where a CPU op is called from, relative to rayon's global pool.
//!
//! A parallel loop called from a thread outside the pool hands its work to
//! the pool and sleeps until it is done (rayon's cold path, a lock and a
//! condition variable), ~10-20 us per call on a 2-vCPU VM; a worker of the
//! pool that calls one takes part in it and starts in ~2 us (a bare loop of
//! ten empty tasks: 24 us from outside, 1.7 us from a worker;
//! `docs/perf-log.md`). So a training loop runs on a worker ([`on_pool`]),
//! and ops whose tasks are short choose smaller tasks, or go parallel at
//! smaller sizes, when [`in_pool`] says the start is cheap. No op's
//! arithmetic depends on either: the same bits from any thread.

/// Whether the calling thread is a worker of a rayon pool (a parallel loop
/// started here is cheap).
#[inline]
pub fn in_pool() -> bool {
    rayon::current_thread_index().is_some()
}

/// Runs `f` on a worker thread of rayon's global pool (directly when the
/// caller is one already) and returns its result. A training loop on the
/// CPU should run inside it, as `kestrel train` does.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if in_pool() {
        return f();
    }
    rayon::scope(|_| f())
}
