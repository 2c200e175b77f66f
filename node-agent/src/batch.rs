//! Batched map updates (`BPF_MAP_UPDATE_BATCH`, Linux ≥ 5.6), which aya 0.14 does not expose.
//! The only unsafe code of the project: one `bpf()` system call with a fully initialised
//! attribute block pointing at two slices that outlive the call.

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
