//! A 4 KiB-aligned heap buffer for O_DIRECT I/O through io_uring.
//! (`Vec<u8>` is not reliably aligned, and O_DIRECT then fails with EINVAL;
//! neon's `AlignedBufferMut` is the model.)
//!
//! Buffers for payloads and disk reads, which are overwritten whole before
//! anyone reads them, come from a per-thread pool of recycled allocations:
//! a fresh allocation costs a memset (or page faults) per request, which
//! showed as 7% of a storage server's time at 1 MiB writes.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical block size we serve.
pub const ALIGN: usize = 4096;

/// Bytes of recycled buffers one thread keeps for reuse.
const POOL_BYTES: usize = 64 << 20;
/// Buffers of one size kept, so that one size (many 4 KiB reads) cannot
/// fill the pool and leave none for another (1 MiB writes).
const POOL_PER_SIZE: usize = 32;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    /// Given to the pool on drop rather than freed.
    recycle: bool,
}

/// Recycled allocations by size. Every byte in them was initialized when
/// they were first allocated (zeroed), so handing one out again is sound.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<NonNull<u8>>>,
    bytes: usize,
}

impl Pool {
    fn take(&mut self, size: usize) -> Option<NonNull<u8>> {
        let ptr = self.free.get_mut(&size)?.pop()?;
        self.bytes -= size;
        Some(ptr)
    }

    /// Keep `ptr` unless the pool is full; gives it back if not kept.
    fn put(&mut self, size: usize, ptr: NonNull<u8>) -> Result<(), NonNull<u8>> {
        let same = self.free.entry(size).or_default();
        if self.bytes + size > POOL_BYTES || same.len() >= POOL_PER_SIZE {
            return Err(ptr);
        }
        self.bytes += size;
        same.push(ptr);
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (size, ptrs) in self.free.drain() {
            let layout = layout_for(size);
            for ptr in ptrs {
                // SAFETY: allocated in `zeroed` with this layout and owned by the pool.
                unsafe { dealloc(ptr.as_ptr(), layout) }
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

fn layout_for(size: usize) -> Layout {
    match Layout::from_size_align(size, ALIGN) {
        Ok(layout) => layout,
        // Only for sizes near usize::MAX; every caller passes a validated length.
        Err(_) => handle_alloc_error(Layout::new::<[u8; ALIGN]>()),
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes (its allocation is rounded up to 4 KiB).
    pub fn zeroed(len: usize) -> Self {
        let layout = layout_for(len.max(1).next_multiple_of(ALIGN));
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout);
        };
        AlignedBuf {
            ptr,
            len,
            layout,
            recycle: false,
        }
    }

    /// A buffer of `len` bytes that the caller overwrites whole before
    /// reading it (a payload received into it, a disk read): its bytes are
    /// those of an earlier buffer, or zeroes. It goes back to this thread's
    /// pool when dropped.
    pub fn for_overwrite(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(ALIGN);
        let recycled = POOL
            .try_with(|pool| pool.borrow_mut().take(size))
            .ok()
            .flatten();
        match recycled {
            Some(ptr) => AlignedBuf {
                ptr,
                len,
                layout: layout_for(size),
                recycle: true,
            },
            None => {
                let mut fresh = Self::zeroed(len);
                fresh.recycle = true;
                fresh
            }
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let (size, ptr) = (self.layout.size(), self.ptr);
        let kept = self.recycle
            && POOL
                .try_with(|pool| pool.borrow_mut().put(size, ptr).is_ok())
                .unwrap_or(false);
        if !kept {
            // SAFETY: allocated in `zeroed` with exactly this layout, and not pooled.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

// SAFETY: an `AlignedBuf` owns its allocation alone, like a `Box<[u8]>`;
// dropped on another thread it goes to that thread's pool or is freed.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len <= layout.size()` initialized bytes (zeroed
        // at allocation, perhaps written since) and we hold the only pointer to them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

// SAFETY: the allocation is stable until drop; every byte is initialized
// (zeroed at allocation) and `len` never exceeds the allocation.
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
    fn bytes_total(&self) -> usize {
        self.len
    }
}

// SAFETY: as for IoBuf; the buffer is fully initialized from the start, so
// `set_init` has nothing to record.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, _pos: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4096, 5000, 1 << 20] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|b| *b == 0));
            if len > 0 {
                buf[len - 1] = 7;
                assert_eq!(buf[len - 1], 7);
            }
        }
    }

    #[test]
    fn recycled_buffers_are_reused_only_at_their_size() {
        let mut first = AlignedBuf::for_overwrite(8192);
        first[0] = 9;
        let ptr = first.as_ptr();
        drop(first);
        let other_size = AlignedBuf::for_overwrite(4096);
        assert_ne!(other_size.as_ptr(), ptr);
        let again = AlignedBuf::for_overwrite(8000);
        assert_eq!(again.as_ptr(), ptr, "same 8 KiB allocation");
        assert_eq!(again.len(), 8000);
        assert_eq!(again.as_ptr() as usize % ALIGN, 0);
        assert_eq!(again[0], 9, "recycled bytes are old data, not zeroes");
        // Zeroed buffers never come from the pool.
        drop(again);
        assert!(AlignedBuf::zeroed(8192).iter().all(|b| *b == 0));
    }

    #[test]
    fn the_pool_is_bounded_overall_and_per_size() {
        let held: Vec<_> = (0..(POOL_BYTES >> 20) + 4)
            .map(|_| AlignedBuf::for_overwrite(1 << 20))
            .collect();
        drop(held);
        let (pooled, of_size) = POOL.with(|pool| {
            let pool = pool.borrow();
            (pool.bytes, pool.free.get(&(1 << 20)).map_or(0, Vec::len))
        });
        assert!(pooled <= POOL_BYTES, "{pooled} bytes pooled");
        assert_eq!(of_size, POOL_PER_SIZE);
        // Many small buffers leave room for the large ones.
        drop(
            (0..1000)
                .map(|_| AlignedBuf::for_overwrite(4096))
                .collect::<Vec<_>>(),
        );
        let small = POOL.with(|pool| pool.borrow().free.get(&4096).map_or(0, Vec::len));
        assert_eq!(small, POOL_PER_SIZE);
    }
}
