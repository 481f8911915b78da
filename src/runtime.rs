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

/// SIGINT and SIGTERM, watched from the moment this is made. Servers make
/// it before they announce that they serve, so that a signal sent right
/// after the announcement shuts them down cleanly instead of killing them.
pub struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Start watching; must run inside a runtime.
    pub fn watch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    /// Wait for either signal.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
