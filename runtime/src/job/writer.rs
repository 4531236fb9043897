//! Rank 0's checkpoint writer: the step hands it a checkpoint encoded in memory and goes on
//! training while a thread writes, fsyncs and renames the file.
//!
//! At most one write is in flight: handing over the next checkpoint first waits for the previous
//! write, whose result (and any error) comes back then. A crash in the middle of a write leaves
//! the previous checkpoint as the newest complete one (the write is atomic, see
//! [`crate::checkpoint`]).

use std::{
    path::PathBuf,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::{
    checkpoint::{Checkpointer, Encoded},
    Error, Result,
};

/// A finished write: the file, its step, and the time from the hand-over to the file being
/// durable.
pub(super) struct Written {
    pub(super) path: PathBuf,
    pub(super) step: u64,
    pub(super) bytes: usize,
    pub(super) durable_after: Duration,
}

/// The writer thread and its two channels.
pub(super) struct BackgroundWriter {
    jobs: Option<Sender<(Encoded, Instant)>>,
    done: Receiver<Result<Written>>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundWriter {
    pub(super) fn spawn(checkpointer: Checkpointer) -> Self {
        let (jobs, inbox) = bounded::<(Encoded, Instant)>(1);
        let (report, done) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("ballast-checkpoint-writer".into())
            .spawn(move || {
                for (encoded, handed) in inbox {
                    let (step, bytes) = (encoded.step, encoded.bytes.len());
                    let written = checkpointer.write(encoded).map(|path| Written {
                        path,
                        step,
                        bytes,
                        durable_after: handed.elapsed(),
                    });
                    if report.send(written).is_err() {
                        return;
                    }
                }
            })
            .ok();
        Self {
            jobs: Some(jobs),
            done,
            in_flight: false,
            thread,
        }
    }

    /// Hands `encoded` over, after the previous write finished; returns that write.
    ///
    /// # Errors
    /// The previous write's error; [`Error::Io`]-like failure when the writer thread is gone.
    pub(super) fn submit(&mut self, encoded: Encoded) -> Result<Option<Written>> {
        let previous = self.wait()?;
        let Some(jobs) = &self.jobs else {
            return Err(writer_gone());
        };
        jobs.send((encoded, Instant::now())).map_err(|_| writer_gone())?;
        self.in_flight = true;
        Ok(previous)
    }

    /// Waits for the write in flight, if any.
    ///
    /// # Errors
    /// That write's error.
    pub(super) fn wait(&mut self) -> Result<Option<Written>> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(None);
        }
        self.done.recv().map_err(|_| writer_gone())?.map(Some)
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once the write in flight is done.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn writer_gone() -> Error {
    Error::Io {
        action: "handing a checkpoint to its writer thread (it could not be started, or ended)",
        path: PathBuf::new(),
        source: std::io::Error::other("checkpoint writer thread gone"),
    }
}
