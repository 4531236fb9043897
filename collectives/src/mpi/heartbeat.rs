//! The directory of a host's heartbeat files, private to the user who runs the job.
//!
//! Ranks often run as root on a cluster node, and the directory's default name is predictable,
//! so another local user could create it first and plant links or process ids in it. The
//! directory is therefore created with mode 0700, and an existing one is used only when it is a
//! real directory (not a symbolic link), owned by this process's user and closed to everyone
//! else. It is opened once, and every file in it is reached through that open directory without
//! following links, so nothing is written outside it even if its path is replaced later.

use std::{
    ffi::CString,
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::DirBuilderExt},
    },
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::{Error, Result};

/// The heartbeat directory, open.
#[derive(Debug)]
pub(super) struct HeartbeatDir {
    path: PathBuf,
    dir: OwnedFd,
}

/// Where the ranks of this host put their heartbeats: [`crate::env::HEARTBEAT_DIR`] when set,
/// else `ballast-heartbeat-<uid>-<launcher pid>` in `XDG_RUNTIME_DIR` (the user's own runtime
/// directory) when there is one, else in the temporary directory.
pub(super) fn default_path() -> PathBuf {
    if let Some(dir) = std::env::var_os(crate::env::HEARTBEAT_DIR) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    // SAFETY: getuid and getppid have no preconditions and cannot fail.
    let (uid, parent) = unsafe { (libc::getuid(), libc::getppid()) };
    base.join(format!("ballast-heartbeat-{uid}-{parent}"))
}

impl HeartbeatDir {
    /// Creates the directory at `path` with mode 0700, or opens the one there, and checks that
    /// it is private (see the module docs).
    ///
    /// # Errors
    /// [`Error::HeartbeatDir`] naming what is wrong: a symbolic link, not a directory, another
    /// owner, permissions open to group or others, or a directory that cannot be created.
    pub(super) fn open(path: &Path, rank: usize) -> Result<Self> {
        let refuse = |reason: String| Error::HeartbeatDir {
            rank,
            path: path.to_path_buf(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| refuse(format!("its parent cannot be created: {e}")))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(refuse(format!("it cannot be created: {e}"))),
        }
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| refuse("its path holds a NUL byte".into()))?;
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call; O_NOFOLLOW makes
        // open fail (ELOOP) on a symbolic link instead of opening its target.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // Linux answers ENOTDIR for a link under O_DIRECTORY, ELOOP without it.
            return Err(refuse(match (e.raw_os_error(), std::fs::read_link(path)) {
                (Some(libc::ELOOP | libc::ENOTDIR), Ok(target)) => {
                    format!("it is a symbolic link (to {})", target.display())
                }
                (Some(libc::ENOTDIR), Err(_)) => "it is not a directory".into(),
                _ => format!("it cannot be opened: {e}"),
            }));
        }
        // SAFETY: `fd` was just returned by open(2), is valid, and nothing else owns it.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        let meta = File::from(
            dir.try_clone()
                .map_err(|e| refuse(format!("it cannot be opened: {e}")))?,
        )
        .metadata()
        .map_err(|e| refuse(format!("it cannot be read: {e}")))?;
        check_private(&meta).map_err(refuse)?;
        Ok(Self {
            path: path.to_path_buf(),
            dir,
        })
    }

    /// The directory's path, for messages.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `rank`'s heartbeat: its process id, in `rank-<rank>`, whose modification time is
    /// the beat. Written under another name and renamed, so a process killed halfway through
    /// never leaves an empty file. Failures are ignored: a missed beat is the next one's job.
    pub(super) fn beat(&self, rank: usize) {
        let tmp = format!(".rank-{rank}.tmp");
        let written = self
            .open_at(&tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
            .and_then(|mut f| f.write_all(format!("{}\n", std::process::id()).as_bytes()));
        if written.is_ok() {
            let (from, to) = (c_name(&tmp), c_name(&format!("rank-{rank}")));
            // SAFETY: both names are NUL-terminated strings that outlive the call, relative to
            // the directory descriptor this struct owns; renameat replaces a link, never its
            // target.
            unsafe { libc::renameat(self.dir.as_raw_fd(), from.as_ptr(), self.dir.as_raw_fd(), to.as_ptr()) };
        }
    }

    /// Marks `rank` as ended because of another rank (`stopped-<rank>`): stopped by the launcher,
    /// or by its own watchdog after a stall. Its exit is a consequence, and peers that look for
    /// the rank that died first leave it out.
    pub(super) fn mark_stopped(&self, rank: usize) {
        let _ = self.open_at(
            &format!("stopped-{rank}"),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        );
    }

    /// Whether `rank` was stopped by the launcher ([`HeartbeatDir::mark_stopped`]).
    pub(super) fn was_stopped(&self, rank: usize) -> bool {
        self.open_at(&format!("stopped-{rank}"), libc::O_RDONLY).is_ok()
    }

    /// The process id in `rank`'s heartbeat file, if it has one.
    pub(super) fn pid_of(&self, rank: usize) -> Option<libc::pid_t> {
        let mut text = String::new();
        self.open_at(&format!("rank-{rank}"), libc::O_RDONLY)
            .and_then(|mut f| f.read_to_string(&mut text))
            .ok()?;
        text.trim().parse().ok()
    }

    /// How long ago `rank`'s heartbeat file was last written, if it has one.
    pub(super) fn age_of(&self, rank: usize) -> Option<Duration> {
        let name = c_name(&format!("rank-{rank}"));
        // SAFETY: an all-zero stat is a valid value of the C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `name` is NUL-terminated and outlives the call, `st` is a valid out-pointer,
        // and AT_SYMLINK_NOFOLLOW reads a link itself, not its target.
        if unsafe { libc::fstatat(self.dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            return None;
        }
        let modified = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(st.st_mtime).ok()?)
            + Duration::from_nanos(u64::try_from(st.st_mtime_nsec).ok()?);
        SystemTime::now().duration_since(modified).ok()
    }

    /// Removes `rank`'s heartbeat file, then the directory if it is empty (the last rank's
    /// removal succeeds).
    pub(super) fn remove(&self, rank: usize) {
        for file in [format!("rank-{rank}"), format!("stopped-{rank}")] {
            let name = c_name(&file);
            // SAFETY: `name` is NUL-terminated and outlives the call; unlinkat removes the entry
            // in the directory this struct owns, a link itself and never its target.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) };
        }
        // rmdir fails on a path that is no longer a directory, and on one that is not empty.
        let _ = std::fs::remove_dir(&self.path);
    }

    /// Opens `name` in the directory without following a link; new files get mode 0600.
    fn open_at(&self, name: &str, flags: libc::c_int) -> std::io::Result<File> {
        let name = c_name(name);
        // SAFETY: `name` is NUL-terminated and outlives the call; the mode argument is read
        // only with O_CREAT and is a valid mode either way.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat(2), is valid, and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Whether a directory with `meta` is private to this process's user: owned by it and closed to
/// group and others. The reason when it is not.
fn check_private(meta: &std::fs::Metadata) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "it belongs to uid {}, not to this process's user (uid {me})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("its mode is {mode:04o}, open to other users; it must be 0700"));
    }
    Ok(())
}

/// A file name as a C string (heartbeat names are ASCII and hold no NUL).
fn c_name(name: &str) -> CString {
    CString::new(name).expect("heartbeat file names hold no NUL byte")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ballast-hb-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn refusal(path: &Path) -> String {
        HeartbeatDir::open(path, 0)
            .expect_err("an unsafe directory must be refused")
            .to_string()
    }

    #[test]
    fn a_new_directory_is_private_and_holds_the_beats() {
        let root = scratch("new");
        let path = root.join("hb");
        let hb = HeartbeatDir::open(&path, 0).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
        hb.beat(3);
        assert_eq!(hb.pid_of(3), Some(std::process::id() as libc::pid_t));
        assert!(hb.age_of(3).unwrap() < Duration::from_secs(60));
        assert_eq!(hb.pid_of(4), None);
        // A second rank opens the same directory.
        let other = HeartbeatDir::open(&path, 1).unwrap();
        hb.remove(3);
        assert!(!path.exists(), "the last rank's removal removes the directory");
        drop(other);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_symbolic_link_is_refused_and_nothing_is_written_through_it() {
        let root = scratch("link");
        let target = root.join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = root.join("hb");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let message = refusal(&link);
        assert!(message.contains("is a symbolic link"), "{message}");
        assert!(message.contains("BALLAST_HEARTBEAT_DIR"), "{message}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_directory_open_to_others_is_refused() {
        let root = scratch("loose");
        let path = root.join("hb");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let message = refusal(&path);
        assert!(message.contains("mode is 0777"), "{message}");
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        // As root, a directory handed to another user; otherwise one that root owns.
        let root = scratch("owner");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let path = if unsafe { libc::geteuid() } == 0 {
            let path = root.join("hb");
            std::fs::create_dir(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
            path
        } else {
            PathBuf::from("/")
        };
        let message = refusal(&path);
        assert!(message.contains("not to this process's user"), "{message}");
        if path != Path::new("/") {
            assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        }
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_file_is_refused() {
        let root = scratch("file");
        let path = root.join("hb");
        std::fs::write(&path, "x").unwrap();
        assert!(refusal(&path).contains("not a directory"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
