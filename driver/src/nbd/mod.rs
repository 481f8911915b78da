//! The NBD frontend: attach a Tessera volume to anything that speaks NBD
//! (the Linux nbd client, qemu, nbdcopy, nbdinfo, fio's nbd engine).
//! No maintained, permissively licensed NBD server crate exists, so the
//! protocol is written here: [`proto`] is sans-IO and fuzzed, [`server`]
//! serves it.

pub mod proto;
pub mod server;

pub use server::{Export, Limits, Listen, Listener, serve};
