//! A bound on the host file descriptors the share holds for the guest.
//!
//! The passthrough file system keeps one descriptor per inode the guest has looked up (until the
//! guest forgets it) and one per file or directory it has open (until it releases it). The guest
//! decides how many: a root guest that looks up or opens files without end would take the shim's
//! whole open-file limit (the VMM is in the shim's process), after which the shim could open
//! nothing, not even the sockets of the pod's next exec. [`BoundedFs`] counts what the guest holds
//! and refuses what goes beyond its limit with `ENFILE` ("too many open files in system", as the
//! guest's own kernel says when its file table is full), handing back what it refused at once.
//! Inodes the guest already holds stay usable at the limit; what it forgets or releases makes
//! room again.
//!
//! The bound is exact but for `READDIRPLUS`: it is refused whole at the limit, and one reply may
//! go past it by the entries that fit the guest's buffer (the passthrough looks each one up).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData, ListxattrReply,
    OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::whole_read::read_whole;

/// The default limit: half of the open-file limit the VMM's binaries ask for
/// ([`crate::host::WANTED_FD_LIMIT`]), leaving the other half to the rest of the process.
pub const DEFAULT_MAX_FDS: usize = (crate::host::WANTED_FD_LIMIT / 2) as usize;

/// What the guest holds: lookups per inode, and open handles (files and directories apart).
#[derive(Debug, Default)]
struct Held {
    inodes: HashMap<u64, u64>,
    handles: HashSet<(bool, u64)>,
}

impl Held {
    fn count(&self) -> usize {
        self.inodes.len() + self.handles.len()
    }

    /// Counts a lookup of `inode` (0: a negative entry, nothing held) and an open `handle`
    /// (`(directory, handle)`) together, or neither when what is new would pass `max`.
    fn hold(&mut self, inode: u64, handle: Option<(bool, u64)>, max: usize) -> bool {
        let new_inode = inode != 0 && !self.inodes.contains_key(&inode);
        if self.count() + usize::from(new_inode) + usize::from(handle.is_some()) > max {
            return false;
        }
        if inode != 0 {
            *self.inodes.entry(inode).or_insert(0) += 1;
        }
        self.handles.extend(handle);
        true
    }

    fn forget(&mut self, inode: u64, count: u64) {
        if let Some(lookups) = self.inodes.get_mut(&inode) {
            *lookups = lookups.saturating_sub(count);
            if *lookups == 0 {
                self.inodes.remove(&inode);
            }
        }
    }
}

/// `inner` (inodes are numbers, handles `u64`, as `Vfs` and the passthrough have them), holding at most
/// `max_fds` inodes and handles for the guest.
#[derive(Debug)]
pub struct BoundedFs<F> {
    inner: F,
    max_fds: usize,
    held: Mutex<Held>,
}

fn too_many() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

impl<F> BoundedFs<F>
where
    F: FileSystem<Handle = u64>,
    F::Inode: From<u64> + Into<u64>,
{
    pub fn new(inner: F, max_fds: usize) -> BoundedFs<F> {
        BoundedFs { inner, max_fds, held: Mutex::default() }
    }

    /// Inodes and handles the guest holds now.
    pub fn held(&self) -> usize {
        self.lock().count()
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // The counts stay consistent whatever panicked while they were locked (each update is
        // one map operation).
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn refused(&self, what: &'static str) -> io::Error {
        crate::guest_log!(
            warn,
            what,
            max_fds = self.max_fds,
            "virtio-fs: the guest holds as many host files as it may; refused with ENFILE"
        );
        too_many()
    }

    /// Takes `entry` (a lookup the inner file system made) into the count, or hands it back and
    /// refuses it when it is a new inode and the guest holds `max_fds` already.
    fn admit_entry(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if self.lock().hold(entry.inode, None, self.max_fds) {
            return Ok(entry);
        }
        self.inner.forget(ctx, entry.inode.into(), 1);
        Err(self.refused("inode"))
    }

    /// Takes an open handle (of a directory with `dir`) into the count, or hands it back with
    /// `release` and refuses it when the guest holds `max_fds` already.
    fn admit_handle(&self, dir: bool, handle: Option<u64>, release: impl FnOnce(u64)) -> io::Result<()> {
        let Some(handle) = handle else { return Ok(()) };
        if self.lock().hold(0, Some((dir, handle)), self.max_fds) {
            return Ok(());
        }
        release(handle);
        Err(self.refused(if dir { "open directory" } else { "open file" }))
    }
}

/// Methods passed to the inner file system unchanged.
macro_rules! forward {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            self.inner.$name($($arg),*)
        })*
    };
}

impl<F> FileSystem for BoundedFs<F>
where
    F: FileSystem<Handle = u64>,
    F::Inode: Copy + From<u64> + Into<u64>,
{
    type Inode = F::Inode;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        // The passthrough closes every inode and handle it held (a later INIT starts afresh;
        // before DESTROY, `Vfs` refuses a second INIT, so the counts can only be cleared here).
        self.inner.destroy();
        *self.lock() = Held::default();
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit_entry(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.lock().forget(inode.into(), count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        {
            let mut held = self.lock();
            for (inode, count) in &requests {
                held.forget((*inode).into(), *count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.admit_entry(ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let entry = self.inner.mknod(ctx, inode, name, mode, rdev, umask)?;
        self.admit_entry(ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.admit_entry(ctx, entry)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit_entry(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.admit_handle(false, opened.0, |handle| {
            let _ = self.inner.release(ctx, inode, flags, handle, false, false, None);
        })?;
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let created = self.inner.create(ctx, parent, name, args)?;
        let (inode, handle) = (created.0.inode, created.1);
        // The new file's inode and its handle are held together, or neither.
        if self.lock().hold(inode, handle.map(|handle| (false, handle)), self.max_fds) {
            return Ok(created);
        }
        if let Some(handle) = handle {
            let _ = self.inner.release(ctx, inode.into(), args.flags, handle, false, false, None);
        }
        self.inner.forget(ctx, inode.into(), 1);
        Err(self.refused("created file"))
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.lock().handles.remove(&(false, handle));
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.admit_handle(true, opened.0, |handle| {
            let _ = self.inner.releasedir(ctx, inode, flags, handle);
        })?;
        Ok(opened)
    }

    fn releasedir(&self, ctx: &Context, inode: Self::Inode, flags: u32, handle: u64) -> io::Result<()> {
        self.lock().handles.remove(&(true, handle));
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if self.held() >= self.max_fds {
            return Err(self.refused("directory listing with attributes"));
        }
        // Only entries that reached the reply count: the passthrough forgets the one that did not
        // fit (the callback returns 0).
        self.inner.readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
            let inode = entry.inode;
            let added = add_entry(dir_entry, entry)?;
            if added > 0 {
                // Past the bound by this reply's entries at most (checked before it).
                self.lock().hold(inode, None, usize::MAX);
            }
            Ok(added)
        })
    }

    /// The passthrough's reads, repeated until the request is filled or the file ends: a short
    /// reply would end the file for the guest ([`super::whole_read`]).
    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        read_whole(size, offset, |size, offset| {
            self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
        })
    }

    forward! {
        fn getattr(&self, ctx: &Context, inode: Self::Inode, handle: Option<u64>) -> io::Result<(stat64, Duration)>;
        fn setattr(&self, ctx: &Context, inode: Self::Inode, attr: stat64, handle: Option<u64>, valid: SetattrValid) -> io::Result<(stat64, Duration)>;
        fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>>;
        fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()>;
        fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()>;
        fn rename(&self, ctx: &Context, olddir: Self::Inode, oldname: &CStr, newdir: Self::Inode, newname: &CStr, flags: u32) -> io::Result<()>;
        fn write(&self, ctx: &Context, inode: Self::Inode, handle: u64, r: &mut dyn ZeroCopyReader, size: u32, offset: u64, lock_owner: Option<u64>, delayed_write: bool, flags: u32, fuse_flags: u32) -> io::Result<usize>;
        fn flush(&self, ctx: &Context, inode: Self::Inode, handle: u64, lock_owner: u64) -> io::Result<()>;
        fn fsync(&self, ctx: &Context, inode: Self::Inode, datasync: bool, handle: u64) -> io::Result<()>;
        fn fallocate(&self, ctx: &Context, inode: Self::Inode, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()>;
        fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64>;
        fn setxattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr, value: &[u8], flags: u32) -> io::Result<()>;
        fn getxattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply>;
        fn listxattr(&self, ctx: &Context, inode: Self::Inode, size: u32) -> io::Result<ListxattrReply>;
        fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()>;
        fn readdir(&self, ctx: &Context, inode: Self::Inode, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>) -> io::Result<()>;
        fn fsyncdir(&self, ctx: &Context, inode: Self::Inode, datasync: bool, handle: u64) -> io::Result<()>;
        fn setupmapping(&self, ctx: &Context, inode: Self::Inode, handle: u64, foffset: u64, len: u64, flags: u64, moffset: u64, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        fn removemapping(&self, ctx: &Context, inode: Self::Inode, requests: Vec<RemovemappingOne>, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()>;
        fn lseek(&self, ctx: &Context, inode: Self::Inode, handle: u64, offset: u64, whence: u32) -> io::Result<u64>;
        fn getlk(&self, ctx: &Context, inode: Self::Inode, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<FileLock>;
        fn setlk(&self, ctx: &Context, inode: Self::Inode, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        fn setlkw(&self, ctx: &Context, inode: Self::Inode, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        fn ioctl(&self, ctx: &Context, inode: Self::Inode, handle: u64, flags: u32, cmd: u32, data: IoctlData<'_>, out_size: u32) -> io::Result<IoctlData<'_>>;
        fn bmap(&self, ctx: &Context, inode: Self::Inode, block: u64, blocksize: u32) -> io::Result<u64>;
        fn poll(&self, ctx: &Context, inode: Self::Inode, handle: u64, khandle: u64, flags: u32, events: u32) -> io::Result<u32>;
        fn notify_reply(&self) -> io::Result<()>;
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use fuse_backend_rs::abi::fuse_abi::{EntryOut, ForgetIn, OpenIn, OpenOut, ReleaseIn};
    use vm_memory::ByteValued;

    use super::super::test_utils::{c_name, opcode, FsHarness, ROOT};

    const LIMIT: usize = 8;

    /// A harness whose share holds `files` host files and at most [`LIMIT`] for the guest.
    fn harness(files: usize) -> FsHarness {
        let mut h = FsHarness::with_max_fds(LIMIT).unwrap();
        for n in 0..files {
            std::fs::write(h.dir().join(format!("f{n}")), b"x").unwrap();
        }
        assert_eq!(h.init().unwrap().header.error, 0);
        h
    }

    fn lookup(h: &mut FsHarness, name: &str) -> Result<u64, i32> {
        let reply = h.request(opcode::LOOKUP, ROOT, &c_name(name)).unwrap();
        match reply.header.error {
            0 => Ok(reply.body_as::<EntryOut>().nodeid),
            err => Err(err),
        }
    }

    #[test]
    fn lookups_beyond_the_limit_fail_with_enfile_and_a_forget_makes_room() {
        let mut h = harness(LIMIT + 2);
        let held: Vec<u64> = (0..LIMIT).map(|n| lookup(&mut h, &format!("f{n}")).unwrap()).collect();
        assert_eq!(lookup(&mut h, &format!("f{LIMIT}")), Err(-libc::ENFILE));
        assert_eq!(lookup(&mut h, "f0"), Ok(held[0]), "an inode the guest holds stays usable");
        assert_eq!(lookup(&mut h, "absent"), Err(-libc::ENOENT), "a missing name is still told apart");
        // f0 was looked up twice: forgetting it once leaves it held, twice frees its slot.
        for nlookup in [1, 1] {
            h.request(opcode::FORGET, held[0], ForgetIn { nlookup }.as_slice()).unwrap();
        }
        assert!(lookup(&mut h, &format!("f{LIMIT}")).is_ok(), "room again after the forget");
        assert_eq!(lookup(&mut h, &format!("f{}", LIMIT + 1)), Err(-libc::ENFILE));
    }

    #[test]
    fn open_handles_count_too_and_a_refused_open_holds_nothing() {
        let mut h = harness(1);
        let file = lookup(&mut h, "f0").unwrap();
        let open = |h: &mut FsHarness| {
            let reply = h
                .request(
                    opcode::OPEN,
                    file,
                    OpenIn { flags: libc::O_RDONLY as u32, ..Default::default() }.as_slice(),
                )
                .unwrap();
            (reply.header.error == 0).then(|| reply.body_as::<OpenOut>().fh).ok_or(reply.header.error)
        };
        let handles: Vec<u64> = (1..LIMIT).map(|_| open(&mut h).unwrap()).collect();
        assert_eq!(open(&mut h), Err(-libc::ENFILE), "one inode and {} handles are the limit", LIMIT - 1);
        let release = ReleaseIn { fh: handles[0], ..Default::default() };
        assert_eq!(h.request(opcode::RELEASE, file, release.as_slice()).unwrap().header.error, 0);
        assert!(open(&mut h).is_ok(), "a released handle makes room");
        assert_eq!(open(&mut h), Err(-libc::ENFILE));
    }

    #[test]
    fn only_a_destroyed_session_starts_again_with_nothing_held() {
        // DESTROY re-imports the share, which sets umask 0: on this thread only, as on the
        // device's worker.
        super::super::share::own_fs_context_without_umask().unwrap();
        let mut h = harness(LIMIT + 1);
        for n in 0..LIMIT {
            lookup(&mut h, &format!("f{n}")).unwrap();
        }
        assert_eq!(lookup(&mut h, &format!("f{LIMIT}")), Err(-libc::ENFILE));
        assert_ne!(h.init().unwrap().header.error, 0, "a second INIT is refused, the counts kept");
        assert_eq!(lookup(&mut h, &format!("f{LIMIT}")), Err(-libc::ENFILE));
        h.request(opcode::DESTROY, 0, &[]).unwrap();
        assert_eq!(h.init().unwrap().header.error, 0, "the guest mounts the share again");
        assert!(lookup(&mut h, &format!("f{LIMIT}")).is_ok());
    }
}
