//! What aya 0.14 does not expose, and the only unsafe code of the project: batched map updates
//! (`BPF_MAP_UPDATE_BATCH`, Linux ≥ 5.6: one `bpf()` system call with a fully initialised
//! attribute block pointing at two slices that outlive the call), and a shared mapping of a
//! `BPF_F_MMAPABLE` array's first value, changed with atomic instructions ([`SharedU64`]).

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

/// `BPF_MAP_UPDATE_BATCH` from `enum bpf_cmd`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] → values[i]` for every `i` in one system call. `K` and `V` must be the
/// map's exact key and value types (the byte arrays of `maps.rs`, or `u32`). Returns how many
/// elements the kernel wrote.
pub fn update<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> std::io::Result<usize> {
    if keys.len() != values.len() {
        return Err(std::io::Error::other("keys and values differ in number"));
    }
    if keys.is_empty() {
        return Ok(0);
    }
    let count = u32::try_from(keys.len()).map_err(|_| std::io::Error::other("batch too large"))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a complete, zero-initialised `batch` attribute of the size passed; its
    // pointers refer to `count` keys and `count` values that stay borrowed for the whole call,
    // and the kernel reads `count × key_size` and `count × value_size` bytes from them (the
    // caller's types are the map's key and value types). The kernel writes back only `count`
    // inside `attr`, which we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.count as usize)
}

/// The first `u64` of a `BPF_F_MMAPABLE` array map, mapped into this process: changed with
/// an atomic instruction, so a program reading it never sees a value half written (a map
/// update copies with `memcpy`, which may write an 8-byte value a byte at a time).
pub struct SharedU64 {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory valid until `Drop`; it is only accessed through an
// `AtomicU64`, which is safe to use from any thread.
unsafe impl Send for SharedU64 {}
// SAFETY: as for `Send`: all access is atomic.
unsafe impl Sync for SharedU64 {}

impl SharedU64 {
    /// Maps the first page of `map` (an array created with `BPF_F_MMAPABLE` whose value
    /// type is `u64`) read-write and shared.
    pub fn map(map: BorrowedFd<'_>) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page).unwrap_or(4096).max(8);
        // SAFETY: a new mapping (no address hint) of `len` bytes of the map's data, which the
        // kernel page-aligns and sizes to whole pages for mmapable arrays; failure is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<std::sync::atomic::AtomicU64>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    fn cell(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: the mapping is page-aligned (so 8-byte aligned), at least 8 bytes long,
        // lives until `Drop`, and the kernel and this type access it only as an atomic u64.
        unsafe { self.ptr.as_ref() }
    }

    /// Adds `n`; returns the new value.
    pub fn add(&self, n: u64) -> u64 {
        self.cell()
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst)
            .wrapping_add(n)
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.cell().load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SharedU64 {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl std::fmt::Debug for SharedU64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedU64")
            .field("value", &self.get())
            .finish()
    }
}
