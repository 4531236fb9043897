//! The metrics file: one JSON object per line, appended, flushed per record.
//!
//! Appending never overwrites an earlier run's records; each record carries the rank and the
//! step so several runs or ranks can share a file and still be told apart.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

/// Appends JSON lines to a file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (creating it and its directory).
    ///
    /// # Errors
    /// The IO error, with the path.
    pub fn append(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("opening metrics file {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Writes one record and flushes it.
    ///
    /// # Errors
    /// The IO error.
    pub fn record(&mut self, value: &serde_json::Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
