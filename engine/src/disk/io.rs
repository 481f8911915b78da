//! The switchable I/O engine: io_uring with O_DIRECT by default, plain file
//! I/O only for filesystems that refuse O_DIRECT (tmpfs).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio_uring::buf::BoundedBuf;

use crate::disk::aligned::{AlignedBuf, FillError};

/// Block I/O on one file or device. Methods take and give back owned
/// buffers, as io_uring needs the memory to stay put until completion.
#[allow(async_fn_in_trait)] // every task runs on one thread: no Send bound is wanted
pub trait BlockDevice {
    /// Fill `buf[range]` from the device at byte `pos`.
    async fn read_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf);
    /// Write `buf[range]` to the device at byte `pos`.
    async fn write_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf);
    /// Make completed writes durable (fdatasync).
    async fn sync_data(&self) -> io::Result<()>;
}

/// Which engine a server uses; set in its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoEngine {
    /// io_uring with O_DIRECT (the page cache is bypassed).
    #[default]
    Uring,
    /// Positioned reads and writes on a plain file descriptor, through the
    /// page cache; for filesystems without O_DIRECT such as tmpfs.
    Std,
}

impl std::str::FromStr for IoEngine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" => Ok(IoEngine::Uring),
            "std" => Ok(IoEngine::Std),
            other => Err(format!(
                "unknown I/O engine {other:?}: expected uring or std"
            )),
        }
    }
}

/// io_uring on a file opened with O_DIRECT.
#[derive(Debug)]
pub struct UringDevice {
    file: tokio_uring::fs::File,
}

impl UringDevice {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        Ok(UringDevice {
            file: tokio_uring::fs::File::from_std(file),
        })
    }
}

impl BlockDevice for UringDevice {
    async fn read_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        // The kernel fills the range; it must leave no unfilled gap before it.
        if range.start > range.end || range.start > buf.len() || range.end > buf.capacity() {
            return (Err(range_error()), buf);
        }
        // Nothing to read (and `slice` takes no empty range at the end).
        if range.is_empty() {
            return (Ok(()), buf);
        }
        let (result, slice) = self.file.read_exact_at(buf.slice(range), pos).await;
        (result, slice.into_inner())
    }

    async fn write_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        if range.start > range.end || range.end > buf.len() {
            return (Err(range_error()), buf);
        }
        if range.is_empty() {
            return (Ok(()), buf);
        }
        let (result, slice) = self.file.write_all_at(buf.slice(range), pos).await;
        (result, slice.into_inner())
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data().await
    }
}

/// Plain positioned I/O; each call blocks the server's thread for its duration,
/// which on tmpfs is a memory copy.
#[derive(Debug)]
pub struct StdDevice {
    file: File,
}

impl StdDevice {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(StdDevice { file })
    }
}

fn range_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "range outside the buffer")
}

/// Fill `range` of `buf` by `read`; the bytes become readable only if it succeeds.
fn fill(
    buf: &mut AlignedBuf,
    range: Range<usize>,
    read: impl FnOnce(&mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    buf.fill_with(range, read).map_err(|e| match e {
        FillError::Range { .. } => range_error(),
        FillError::Fill(e) => e,
    })
}

impl BlockDevice for StdDevice {
    async fn read_at(
        &self,
        mut buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        let result = fill(&mut buf, range, |dst| self.file.read_exact_at(dst, pos));
        (result, buf)
    }

    async fn write_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        let result = match buf.get(range) {
            Some(src) => self.file.write_all_at(src, pos),
            None => Err(range_error()),
        };
        (result, buf)
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A device in memory: for unit tests and harnesses that need no file,
/// process or socket. Clones share the same bytes, so a test can reopen a
/// store on what the previous one wrote, or damage it in between.
#[derive(Debug, Clone)]
pub struct MemDevice {
    bytes: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
    failing: std::rc::Rc<std::cell::RefCell<Option<Range<u64>>>>,
}

impl MemDevice {
    /// A blank device of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemDevice {
            bytes: std::rc::Rc::new(std::cell::RefCell::new(vec![0; size])),
            failing: std::rc::Rc::default(),
        }
    }

    /// From now on writes that touch `range` fail with an I/O error (a
    /// dying disk, or only its metadata area); `None` heals it.
    pub fn fail_writes(&self, range: Option<Range<u64>>) {
        *self.failing.borrow_mut() = range;
    }

    /// Change the bytes in place (to damage metadata, say).
    pub fn edit(&self, f: impl FnOnce(&mut [u8])) {
        f(&mut self.bytes.borrow_mut());
    }
}

fn past_end() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the device")
}

impl BlockDevice for MemDevice {
    async fn read_at(
        &self,
        mut buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        let bytes = self.bytes.borrow();
        let result = fill(&mut buf, range, |dst| {
            usize::try_from(pos)
                .ok()
                .and_then(|at| bytes.get(at..at.checked_add(dst.len())?))
                .map(|src| dst.copy_from_slice(src))
                .ok_or_else(past_end)
        });
        drop(bytes);
        (result, buf)
    }

    async fn write_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        let end = pos.saturating_add(range.len() as u64);
        if self
            .failing
            .borrow()
            .as_ref()
            .is_some_and(|r| pos < r.end && r.start < end)
        {
            return (Err(io::Error::other("injected write failure")), buf);
        }
        let mut bytes = self.bytes.borrow_mut();
        let result = match buf.get(range) {
            Some(src) => usize::try_from(pos)
                .ok()
                .and_then(|at| bytes.get_mut(at..at.checked_add(src.len())?))
                .map(|dst| dst.copy_from_slice(src))
                .ok_or_else(past_end),
            None => Err(range_error()),
        };
        drop(bytes);
        (result, buf)
    }

    async fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The device behind a store, as chosen by the config.
#[derive(Debug)]
pub enum AnyDevice {
    Uring(UringDevice),
    Std(StdDevice),
}

impl BlockDevice for AnyDevice {
    async fn read_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        match self {
            AnyDevice::Uring(d) => d.read_at(buf, range, pos).await,
            AnyDevice::Std(d) => d.read_at(buf, range, pos).await,
        }
    }

    async fn write_at(
        &self,
        buf: AlignedBuf,
        range: Range<usize>,
        pos: u64,
    ) -> (io::Result<()>, AlignedBuf) {
        match self {
            AnyDevice::Uring(d) => d.write_at(buf, range, pos).await,
            AnyDevice::Std(d) => d.write_at(buf, range, pos).await,
        }
    }

    async fn sync_data(&self) -> io::Result<()> {
        match self {
            AnyDevice::Uring(d) => d.sync_data().await,
            AnyDevice::Std(d) => d.sync_data().await,
        }
    }
}
