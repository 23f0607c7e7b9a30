//! `backend::cpu::on_pool`: the closure runs on a worker of rayon's global
//! pool (where the training loop runs, so that its ops' parallel loops
//! start from inside the pool), its result comes back, and a caller that
//! is a worker already runs it in place.

use kestrel::backend::cpu::on_pool;

#[test]
fn runs_on_a_pool_worker_and_returns_the_result() {
    assert_eq!(
        rayon::current_thread_index(),
        None,
        "the test thread is no worker"
    );
    let (index, value) = on_pool(|| (rayon::current_thread_index(), 6 * 7));
    assert!(index.is_some(), "on_pool ran its closure outside the pool");
    assert_eq!(value, 42);
}

#[test]
fn a_worker_runs_it_in_place() {
    on_pool(|| {
        let outer = std::thread::current().id();
        let inner = on_pool(|| std::thread::current().id());
        assert_eq!(outer, inner, "a nested on_pool moved to another thread");
    });
}

#[test]
fn errors_come_back_unchanged() {
    let r: kestrel::Result<()> =
        on_pool(|| Err(kestrel::error::Error::invalid("op", "what", "why")));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("op") && e.contains("what") && e.contains("why"),
        "{e}"
    );
}
