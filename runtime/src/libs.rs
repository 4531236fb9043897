//! Finding the CUDA libraries that are loaded at run time, under the names a plain install gives
//! them.
//!
//! cudarc (the layer under burn's CUDA backend and ballast's NCCL communicator) opens NCCL and
//! NVRTC by bare names only, through the dynamic loader: for NCCL `libnccl.so`, then
//! `libnccl.so.12`, `.11`, `.10`, `.9`, `.1` (cudarc 0.19.10, `get_lib_name_candidates`). A system
//! NCCL package installs `libnccl.so.2`, and NVIDIA's `nvidia-nccl-cu*` wheel ships only
//! `lib/libnccl.so.2`: neither name is tried, so NCCL is "missing" on a machine that has it. The
//! same holds for NVRTC 13 (`libnvrtc.so.13`) from a CUDA 13 toolkit or wheel.
//!
//! The dynamic loader reads `LD_LIBRARY_PATH` once, when a process starts, so it cannot be
//! extended from inside a running process. [`relaunch_with_found_libraries`] therefore finds the
//! versioned files ([`find`], in [`search_dirs`]), links each under the bare name cudarc tries
//! first in a private directory, and replaces the process with itself, that directory first on
//! `LD_LIBRARY_PATH` (the same arguments and process id, so launchers such as `mpirun` do not
//! notice). The binaries (`ballast`, the example jobs, the GPU kit) call it first thing; a user's
//! own program can call it the same way, or set `LD_LIBRARY_PATH` itself.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

/// Set in the relaunched process, so it does not relaunch again.
pub const RELAUNCHED_ENV: &str = "BALLAST_LIBS_RELAUNCHED";

/// A library cudarc loads by name, and the versioned file names a plain install provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaLibrary {
    /// Short name for messages (`NCCL`, `NVRTC`).
    pub what: &'static str,
    /// The first name cudarc tries, under which the link is made.
    pub loaded_as: &'static str,
    /// The names of the real files, most wanted first.
    pub file_names: &'static [&'static str],
    /// How to install it.
    pub fix: &'static str,
}

/// NCCL: `libnccl.so.2` is the soname of every NCCL 2 release.
pub const NCCL: CudaLibrary = CudaLibrary {
    what: "NCCL",
    loaded_as: "libnccl.so",
    file_names: &["libnccl.so.2"],
    fix: "install NCCL (NVIDIA's package libnccl2, or `pip install nvidia-nccl-cu12`), or add the folder \
          holding libnccl.so.2 to LD_LIBRARY_PATH",
};

/// NVRTC, the CUDA runtime compiler burn's CUDA kernels are compiled with.
pub const NVRTC: CudaLibrary = CudaLibrary {
    what: "NVRTC",
    loaded_as: "libnvrtc.so",
    file_names: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"],
    fix: "install the CUDA toolkit's NVRTC (`pip install nvidia-cuda-nvrtc-cu12`, or the cuda-nvrtc \
          package), or add its folder to LD_LIBRARY_PATH",
};

/// The libraries [`relaunch_with_found_libraries`] looks after.
pub const LIBRARIES: [CudaLibrary; 2] = [NCCL, NVRTC];

/// Whether the dynamic loader opens `name` as it stands (what cudarc does with it).
pub fn loads_by_name(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call; a handle that
    // dlopen returns is closed once, at once, and nothing from the library is used.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// The folders searched for a library's versioned file, in order: `LD_LIBRARY_PATH`,
/// `CUDA_PATH` and `CUDA_HOME` (`lib64`, `lib`), the system's library folders and the loader's
/// cache (`ldconfig -p`), the usual CUDA toolkit folders, then the `nvidia/*/lib` folders of
/// NVIDIA's Python wheels in this environment's site-packages (a virtualenv's or conda's first).
/// [`lookup`] then asks the `python3` on `PATH` for its site-packages, where none of these has
/// the library.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/cuda/targets/sbsa-linux/lib",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    dirs.extend(cache_dirs());
    for prefix in ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".local")))
        .chain(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from))
    {
        dirs.extend(wheel_dirs(&prefix.join("lib")));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// The folders of the libraries in the loader's cache (`ldconfig -p`), where ldconfig exists.
fn cache_dirs() -> Vec<PathBuf> {
    let out = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]
        .iter()
        .find_map(|bin| std::process::Command::new(bin).arg("-p").output().ok());
    let Some(out) = out else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("libnccl") || l.contains("libnvrtc"))
        .filter_map(|l| l.rsplit("=> ").next())
        .filter_map(|p| Path::new(p.trim()).parent().map(Path::to_path_buf))
        .collect()
}

/// `<lib>/python3*/{site,dist}-packages/nvidia/*/lib` under one prefix's `lib` folder.
fn wheel_dirs(lib: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(lib) else {
        return out;
    };
    let mut pythons: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
        })
        .collect();
    pythons.sort();
    for python in pythons {
        for packages in ["site-packages", "dist-packages"] {
            let nvidia = python.join(packages).join("nvidia");
            let Ok(kinds) = std::fs::read_dir(&nvidia) else {
                continue;
            };
            let mut kinds: Vec<PathBuf> = kinds.flatten().map(|e| e.path().join("lib")).collect();
            kinds.sort();
            out.extend(kinds.into_iter().filter(|p| p.is_dir()));
        }
    }
    out
}

/// The first of `lib`'s versioned files in `dirs` (in the order of both lists).
pub fn find(lib: &CudaLibrary, dirs: &[PathBuf]) -> Option<PathBuf> {
    lib.file_names
        .iter()
        .find_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Links `found` (a library and its file) under the names cudarc tries, in a private folder,
/// and returns the folder. The folder is `ballast-libs-<uid>-<hash of the files>` in
/// `XDG_RUNTIME_DIR` (else the temporary folder), made with mode 0700 and refused when it exists
/// but belongs to another user or is writable by others; each link is made under a temporary
/// name and renamed into place, so ranks starting together on one host share it safely.
///
/// # Errors
/// When the folder or a link cannot be made, or the folder is not this user's alone.
pub fn link_dir(found: &[(CudaLibrary, PathBuf)]) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    found
        .iter()
        .for_each(|(lib, path)| (lib.loaded_as, path).hash(&mut hasher));
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let base = std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("ballast-libs-{uid}-{:016x}", hasher.finish()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(&dir)?;
            if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} exists but is not a folder of this user's alone; remove it",
                    dir.display()
                )));
            }
        }
        Err(e) => return Err(e),
    }
    for (lib, path) in found {
        let tmp = dir.join(format!("{}.{}.tmp", lib.loaded_as, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(path, &tmp)?;
        std::fs::rename(&tmp, dir.join(lib.loaded_as))?;
    }
    Ok(dir)
}

/// What [`relaunch_with_found_libraries`] found for the libraries that do not load by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Libraries found under a versioned name only, with their files.
    pub to_link: Vec<(CudaLibrary, PathBuf)>,
    /// Libraries found nowhere.
    pub missing: Vec<CudaLibrary>,
}

/// Looks for each library of [`LIBRARIES`] that does not load by cudarc's names.
pub fn lookup() -> Lookup {
    let mut out = Lookup {
        to_link: Vec::new(),
        missing: Vec::new(),
    };
    let dirs = search_dirs();
    let mut python: Option<Vec<PathBuf>> = None;
    for lib in LIBRARIES {
        if cudarc_tries_any(&lib) {
            continue;
        }
        // Last, the wheels of the Python on PATH (a virtualenv that is not activated), asked
        // only when nothing else has the library: it costs a Python start.
        let found = find(&lib, &dirs).or_else(|| find(&lib, python.get_or_insert_with(python_wheel_dirs)));
        match found {
            Some(path) => out.to_link.push((lib, path)),
            None => out.missing.push(lib),
        }
    }
    out
}

/// The `nvidia/*/lib` folders of the site-packages of the `python3` on `PATH`.
fn python_wheel_dirs() -> Vec<PathBuf> {
    let script = "import site, sys; print('\\n'.join(site.getsitepackages() + [p for p in sys.path if p.endswith('-packages')]))";
    let Ok(out) = std::process::Command::new("python3").args(["-c", script]).output() else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for packages in String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from) {
        let Ok(kinds) = std::fs::read_dir(packages.join("nvidia")) else {
            continue;
        };
        let mut kinds: Vec<PathBuf> = kinds.flatten().map(|e| e.path().join("lib")).collect();
        kinds.sort();
        dirs.extend(kinds.into_iter().filter(|p| p.is_dir()));
    }
    dirs
}

/// Whether a name cudarc 0.19.10 tries for `lib` loads (the bare name, `.so.12`, `.so.11`,
/// `.so.10`, `.so.9`, `.so.1`).
fn cudarc_tries_any(lib: &CudaLibrary) -> bool {
    ["", ".12", ".11", ".10", ".9", ".1"]
        .iter()
        .any(|v| loads_by_name(&format!("{}{v}", lib.loaded_as)))
}

/// Makes the CUDA libraries of [`LIBRARIES`] loadable by the names cudarc tries: where one is
/// installed only under a versioned name, links it in a private folder and replaces this
/// process with itself, that folder first on `LD_LIBRARY_PATH` (see the module docs). Returns
/// when nothing needs linking, when this process is already the relaunched one, or when the
/// relaunch fails (with a warning on stderr: the libraries then stay missing, which the GPU
/// paths report as typed errors). Call it first thing in `main`, before any thread starts.
pub fn relaunch_with_found_libraries() {
    if std::env::var_os(RELAUNCHED_ENV).is_some() {
        return;
    }
    let lookup = lookup();
    if lookup.to_link.is_empty() {
        return;
    }
    let dir = match link_dir(&lookup.to_link) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("ballast: warning: cannot link the CUDA libraries found ({e}); they stay unloaded");
            return;
        }
    };
    let mut paths = vec![dir];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    let Ok(joined) = std::env::join_paths(paths) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .env(RELAUNCHED_ENV, "1")
        .exec();
    eprintln!("ballast: warning: cannot relaunch with the CUDA libraries found ({err}); they stay unloaded");
}

/// Where each library of [`LIBRARIES`] is loaded from in this process, for `ballast doctor`:
/// the file the dynamic loader opens under cudarc's names, or `None`.
pub fn loaded_paths() -> Vec<(CudaLibrary, Option<PathBuf>)> {
    LIBRARIES
        .iter()
        .map(|lib| {
            let path = ["", ".12", ".11", ".10", ".9", ".1"]
                .iter()
                .map(|v| format!("{}{v}", lib.loaded_as))
                .find(|n| loads_by_name(n))
                .and_then(|n| resolve(&n));
            (*lib, path)
        })
        .collect()
}

/// The file the dynamic loader opens for `name` (through `dlinfo`'s link map), links resolved.
fn resolve(name: &str) -> Option<PathBuf> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` lives through the calls; the handle is closed once; `map` is written by
    // dlinfo on success and read only then, while the handle keeps the link map alive.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let mut map: *mut libc::c_void = std::ptr::null_mut();
        let path = if libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut libc::c_void).cast(),
        ) == 0
            && !map.is_null()
        {
            let link_map = map.cast::<LinkMap>();
            let l_name = (*link_map).l_name;
            (!l_name.is_null()).then(|| PathBuf::from(std::ffi::CStr::from_ptr(l_name).to_string_lossy().into_owned()))
        } else {
            None
        };
        libc::dlclose(handle);
        path.map(|p| std::fs::canonicalize(&p).unwrap_or(p))
    }
}

/// The head of glibc's `struct link_map` (`<link.h>`): the fields `dlinfo(RTLD_DI_LINKMAP)`
/// hands out and every glibc keeps in this order.
#[repr(C)]
struct LinkMap {
    l_addr: usize,
    l_name: *const libc::c_char,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_versioned_file_is_found_in_the_given_folders_in_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("libnccl.so.2"), b"").unwrap();
        std::fs::write(a.path().join("libnvrtc.so.12"), b"").unwrap();
        std::fs::write(b.path().join("libnvrtc.so.13"), b"").unwrap();
        let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find(&NCCL, &dirs), Some(b.path().join("libnccl.so.2")));
        // The newest NVRTC wins over the earlier folder.
        assert_eq!(find(&NVRTC, &dirs), Some(b.path().join("libnvrtc.so.13")));
        assert_eq!(find(&NCCL, &dirs[..1]), None);
    }

    #[test]
    fn links_carry_the_name_cudarc_tries() {
        let a = tempfile::tempdir().unwrap();
        let file = a.path().join("libnccl.so.2");
        std::fs::write(&file, b"").unwrap();
        let dir = link_dir(&[(NCCL, file.clone())]).unwrap();
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), file);
        // A second process finding the same file shares the folder.
        assert_eq!(link_dir(&[(NCCL, file.clone())]).unwrap(), dir);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
