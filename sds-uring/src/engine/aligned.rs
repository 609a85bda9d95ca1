//! The one buffer type for device IO: 4 KiB-aligned memory, as O_DIRECT
//! requires, recycled through a small pool.
//!
//! An [`AlignedBuf`] checks its alignment when it is built and owns its
//! memory outright, so it can be moved into an in-flight io_uring operation
//! and handed back on completion (see the ownership rules in
//! [`super`]). Dropping a pooled buffer returns its memory to the
//! [`BufferPool`] it came from, which keeps allocation off the IO path.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment (and length granularity) of O_DIRECT IO on the devices.
pub const IO_ALIGN: usize = 4096;

/// Smallest pooled buffer capacity, in `IO_ALIGN` units expressed as a power of two.
const MIN_CLASS_SHIFT: u32 = 12;
/// Largest pooled buffer capacity: one chunk (1 MiB).
const MAX_CLASS_SHIFT: u32 = 20;
const CLASS_COUNT: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// Heap memory aligned to [`IO_ALIGN`], with a length that may be shorter than its capacity.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    /// The pool this memory goes back to when dropped, if any.
    pool: Option<Arc<PoolShared>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it
// between threads moves that ownership, and &AlignedBuf only permits reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8]; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes; its capacity is `len` rounded up
    /// to [`IO_ALIGN`] (at least one block).
    pub fn zeroed(len: usize) -> Self {
        let capacity = round_up(len.max(1), IO_ALIGN);
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size (capacity >= IO_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        assert_eq!(ptr.as_ptr() as usize % IO_ALIGN, 0, "allocator broke the alignment");
        Self { ptr, len, capacity, pool: None }
    }

    /// A zero-filled buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, IO_ALIGN).expect("buffer capacity overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the visible length; new bytes are whatever the memory held
    /// (zero for fresh memory, old content for recycled memory).
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "length {len} exceeds capacity {}", self.capacity);
        self.len = len;
    }

    /// Whether this buffer can be used for O_DIRECT IO as it is: its
    /// length is a multiple of [`IO_ALIGN`] (the address always is aligned).
    pub fn is_io_aligned(&self) -> bool {
        self.len.is_multiple_of(IO_ALIGN)
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialized bytes (allocated
        // zeroed, only ever written through &mut), and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            if pool.give_back(self.ptr, self.capacity) {
                return;
            }
        }
        // SAFETY: ptr was allocated by `alloc_zeroed` with exactly this layout
        // and is not referenced elsewhere (we own it and are being dropped).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) };
    }
}

fn round_up(value: usize, to: usize) -> usize {
    value.div_ceil(to) * to
}

/// Memory blocks kept for reuse, per power-of-two size class from 4 KiB to 1 MiB.
struct PoolShared {
    classes: [Mutex<Vec<RecycledBlock>>; CLASS_COUNT],
    max_per_class: usize,
}

/// A block of pool memory not currently owned by any buffer.
struct RecycledBlock(NonNull<u8>);

// SAFETY: a recycled block is memory nobody references; the pool hands it
// to exactly one new AlignedBuf.
unsafe impl Send for RecycledBlock {}

impl PoolShared {
    fn class_of(capacity: usize) -> Option<usize> {
        if !capacity.is_power_of_two() {
            return None;
        }
        let shift = capacity.trailing_zeros();
        (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT)
            .contains(&shift)
            .then(|| (shift - MIN_CLASS_SHIFT) as usize)
    }

    /// Keeps the block for reuse; false when the pool is full (caller frees it).
    fn give_back(&self, ptr: NonNull<u8>, capacity: usize) -> bool {
        let Some(class) = Self::class_of(capacity) else { return false };
        let mut free = self.classes[class].lock().unwrap_or_else(|e| e.into_inner());
        if free.len() >= self.max_per_class {
            return false;
        }
        free.push(RecycledBlock(ptr));
        true
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        for (class, free) in self.classes.iter_mut().enumerate() {
            let capacity = 1usize << (class as u32 + MIN_CLASS_SHIFT);
            for block in free.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
                // SAFETY: every recycled block came from an AlignedBuf of this
                // class's capacity, allocated with that layout, and is unowned.
                unsafe { alloc::dealloc(block.0.as_ptr(), AlignedBuf::layout(capacity)) };
            }
        }
    }
}

/// A pool of aligned buffers; cheap to clone (shared).
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl Default for BufferPool {
    fn default() -> Self {
        Self::new(64)
    }
}

impl BufferPool {
    /// A pool keeping at most `max_per_class` idle buffers of each size class.
    pub fn new(max_per_class: usize) -> Self {
        Self {
            shared: Arc::new(PoolShared {
                classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
                max_per_class,
            }),
        }
    }

    /// A buffer of `len` bytes whose content is unspecified (recycled memory
    /// holds old data; fresh memory is zero). Use [`Self::zeroed`] when the
    /// content matters.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let capacity = round_up(len.max(1), IO_ALIGN).next_power_of_two();
        match PoolShared::class_of(capacity) {
            Some(class) => {
                let recycled =
                    self.shared.classes[class].lock().unwrap_or_else(|e| e.into_inner()).pop();
                let mut buf = match recycled {
                    Some(block) => AlignedBuf { ptr: block.0, len: 0, capacity, pool: None },
                    None => AlignedBuf::zeroed(capacity),
                };
                buf.len = len;
                buf.pool = Some(self.shared.clone());
                buf
            }
            None => AlignedBuf::zeroed(len),
        }
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(&self, len: usize) -> AlignedBuf {
        let mut buf = self.take(len);
        buf.fill(0);
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [0, 1, 512, 4096, 4097, 65536, 1 << 20, (1 << 20) + 1] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len && buf.capacity().is_multiple_of(IO_ALIGN));
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn pool_recycles_memory_of_the_same_class() {
        let pool = BufferPool::new(4);
        let mut first = pool.take(4096);
        first.fill(0xAB);
        let address = first.as_ptr();
        drop(first);
        let again = pool.take(3000);
        assert_eq!(again.as_ptr(), address, "a 3000-byte buffer reuses the 4 KiB block");
        assert_eq!(again.len(), 3000);
        let zeroed = pool.zeroed(4096);
        assert!(zeroed.iter().all(|&b| b == 0));
    }

    #[test]
    fn oversized_buffers_bypass_the_pool() {
        let pool = BufferPool::new(4);
        let big = pool.take((1 << 20) + 4096);
        assert_eq!(big.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(big.len(), (1 << 20) + 4096);
    }
}
