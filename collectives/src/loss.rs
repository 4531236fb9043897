//! What a rank that ends because a peer was lost leaves behind for a supervisor.
//!
//! When the MPI watchdog ends a rank (a collective stalled past its deadline, or the launcher
//! stopped the rank because another one died), the rank names the peers it suspects on stderr.
//! With [`crate::env::REPORT_DIR`] set, it also writes the same finding as JSON to
//! `rank-<rank>.json` in that directory, so that `ballast launch` can tell a rank whose process
//! died (drop it, or start it again) from one that only stopped answering for a while (a
//! transient fault: restart on the same ranks).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Why the reporting rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossEvent {
    /// A collective waited past its deadline.
    Stalled,
    /// The launcher stopped this rank (SIGTERM) because another rank ended first.
    StoppedByLauncher,
}

/// One rank's finding about its lost peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossReport {
    /// The reporting rank.
    pub rank: usize,
    /// Its host name.
    pub host: String,
    /// Why it ended.
    pub event: LossEvent,
    /// Ranks of this host whose process had exited (died or was killed) on their own.
    pub exited: Vec<usize>,
    /// Ranks of this host whose process still runs but stopped answering (stopped, stuck).
    pub stalled: Vec<usize>,
    /// When no rank of this host is to blame: the ranks on other hosts, which this rank cannot
    /// see (empty when every rank runs on this host, or when host names were not known yet).
    pub elsewhere: Vec<usize>,
    /// Every rank's host name, by rank, as the ranks gathered them at start-up (empty when this
    /// rank ended before that): where the supervisor places the survivors.
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl LossReport {
    /// Writes this report into [`crate::env::REPORT_DIR`] when it is set, through a temporary
    /// file and a rename, so a reader never sees half of it. Returns the file written.
    ///
    /// # Errors
    /// IO errors, with the path.
    pub fn write_if_asked(&self) -> std::io::Result<Option<PathBuf>> {
        let Some(dir) = std::env::var_os(crate::env::REPORT_DIR) else {
            return Ok(None);
        };
        self.write_into(Path::new(&dir)).map(Some)
    }

    /// Writes this report as `rank-<rank>.json` into `dir` (see [`LossReport::write_if_asked`]),
    /// unless the rank reported already: its first report stands.
    ///
    /// # Errors
    /// IO errors, with the path.
    pub fn write_into(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("rank-{}.json", self.rank));
        let tmp = dir.join(format!(".rank-{}.json.tmp", self.rank));
        let with_path = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", tmp.display()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(with_path)?;
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        file.write_all(&json).map_err(with_path)?;
        // The first finding stands: a later one (a rank that timed out in a collective, then
        // stalled in MPI_Finalize, say) would only see the consequences of the first. A hard
        // link publishes the whole file and fails when one is there already.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// Every report in `dir`, in rank order; files that are not reports are skipped.
    ///
    /// # Errors
    /// When the directory cannot be read.
    pub fn read_all(dir: &Path) -> std::io::Result<Vec<Self>> {
        let mut reports: Vec<Self> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("rank-") && name.ends_with(".json")
            })
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        reports.sort_by_key(|r| r.rank);
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_through_a_directory() {
        let dir = std::env::temp_dir().join(format!("ballast-loss-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = |rank, exited: Vec<usize>| LossReport {
            rank,
            host: "h".into(),
            event: LossEvent::StoppedByLauncher,
            exited,
            stalled: vec![],
            elsewhere: vec![],
            hosts: vec![],
        };
        report(1, vec![2]).write_into(&dir).unwrap();
        report(0, vec![2]).write_into(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let read = LossReport::read_all(&dir).unwrap();
        assert_eq!(read, vec![report(0, vec![2]), report(1, vec![2])]);
        // A rank's first report stands.
        report(0, vec![1]).write_into(&dir).unwrap();
        assert_eq!(LossReport::read_all(&dir).unwrap()[0], report(0, vec![2]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
