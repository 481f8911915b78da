//! The bottom layer: the device and what is written on it.
//!
//! * [`aligned`]: 4 KiB-aligned buffers and their per-thread pool.
//! * [`io`]: the [`io::BlockDevice`] trait and its devices (io_uring with
//!   O_DIRECT, plain files, memory), chosen by the config.
//! * [`format`]: the on-disk format, pure encode and decode.

pub mod aligned;
pub mod format;
pub mod io;
