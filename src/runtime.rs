//! Async runtimes and signal handling shared by the subcommands.

use anyhow::Context;

/// One thread: admin commands and the management server.
pub fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// Two worker threads (the machine size Tessera is measured on): the bench
/// client, which drives many requests at once.
pub fn multi_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    threads(2)
}

/// An NBD frontend's runtime. One thread is the default: on the 2-core
/// reference machine, where the storage server and the NBD client share
/// the cores, it served a QD32 NBD workload about a quarter faster than two
/// workers handing each request between them (docs/performance.md).
pub fn threads(count: u16) -> anyhow::Result<tokio::runtime::Runtime> {
    if count <= 1 {
        return current_thread();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(count))
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// Wait for SIGINT or SIGTERM.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
