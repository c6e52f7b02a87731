//! The `bpf(2)` commands aya 0.14 does not offer here: `BPF_LINK_UPDATE` on a pinned link
//! (aya makes it only inside its XDP and tc attach code), and `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
//! on a hash map (aya has it only for queues and stacks).

use aya_obj::generated::{bpf_attr, bpf_cmd};
use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Makes the link pinned at `path` run `program` from now on. The kernel replaces the program
/// in place (in the effective arrays of the cgroup and its descendants, or in the netns's
/// `sk_lookup` array), so every run of the hook finds the old program or the new one, never
/// none. ENOLINK: the link's cgroup or netns is gone.
pub(super) fn replace_program(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = open_pinned(path)?;
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = fd_number(link.as_raw_fd());
    attr.link_update.__bindgen_anon_1.new_prog_fd = fd_number(program.as_raw_fd());
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Takes the value at `key` out of the hash map `map` in one call (Linux 5.14 for hash maps):
/// the value, deleted, or `None` if there was none.
pub(super) fn take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    let mut attr = zeroed_attr();
    // SAFETY: writing plain integers into the union's map-element member.
    let element = unsafe { &mut attr.__bindgen_anon_2 };
    element.map_fd = fd_number(map.as_raw_fd());
    element.key = std::ptr::from_ref(key) as u64;
    element.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
    match bpf(bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel wrote the whole value (the map's value size is V's).
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// `BPF_OBJ_GET`: a new descriptor for the object pinned at `path`.
fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain integers; all zeroes is what the kernel expects in every field
    // a command does not use.
    unsafe { std::mem::zeroed() }
}

fn fd_number(fd: i32) -> u32 {
    // Open descriptors are never negative.
    fd as u32
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr of the size passed, alive for the whole call; any
    // path, key or value it points to outlives the call too.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
