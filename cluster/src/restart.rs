//! How `ballast launch` starts a job again after it lost a rank: which ranks to drop, and the
//! launch command rewritten for the ranks that are left.
//!
//! Pure functions over the command's words and the ranks' findings; the supervisor that runs
//! processes is the `ballast` binary's.
//!
//! ```
//! use ballast_cluster::restart::{decide, Findings, Relaunch};
//!
//! let argv: Vec<String> = "mpirun -np 3 resnet --device-memory 2GiB,1GiB,1GiB --checkpoint-dir ck"
//!     .split(' ').map(String::from).collect();
//! // Rank 2's process died; the survivors (2) are at least --min-ranks 2: drop it.
//! let findings = Findings { exited: vec![2], ..Findings::default() };
//! let relaunch = decide(3, 2, &findings);
//! assert_eq!(relaunch, Relaunch::Survivors { dropped: vec![2], ranks: 2 });
//! let argv = relaunch.rewrite(&argv, 3).unwrap();
//! assert_eq!(argv.join(" "), "mpirun -np 2 resnet --device-memory 2GiB,1GiB --checkpoint-dir ck");
//! ```

use std::path::PathBuf;

use crate::{Error, Result};

/// What the ranks that ended reported about their lost peers (merged over the reports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Ranks whose process exited on its own (died, killed, crashed).
    pub exited: Vec<usize>,
    /// Ranks whose process ran on but stopped answering (stopped, stuck): a transient fault.
    pub stalled: Vec<usize>,
    /// Ranks on other hosts, named by survivors that saw no local culprit, that left no report
    /// of their own: their host was lost as a whole.
    pub unreported_elsewhere: Vec<usize>,
}

impl Findings {
    /// The ranks to count as lost: those that exited, and those of a host lost as a whole.
    pub fn lost(&self) -> Vec<usize> {
        let mut lost: Vec<usize> = self.exited.iter().chain(&self.unreported_elsewhere).copied().collect();
        lost.sort_unstable();
        lost.dedup();
        lost
    }
}

/// On which ranks the job starts again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relaunch {
    /// The same ranks: nothing was lost for good (a rank stalled and came back, or nobody was
    /// named), or dropping the lost ranks would leave fewer than `--min-ranks`.
    SameRanks {
        /// Ranks lost but kept, since the survivors alone are too few (their devices are tried
        /// again); empty after a transient fault.
        kept: Vec<usize>,
    },
    /// Without the lost ranks.
    Survivors {
        /// The ranks dropped, in the old numbering.
        dropped: Vec<usize>,
        /// The new number of ranks.
        ranks: usize,
    },
}

/// Where to start again: without the lost ranks when at least `min_ranks` survive, else on the
/// same `world` ranks.
pub fn decide(world: usize, min_ranks: usize, findings: &Findings) -> Relaunch {
    let lost: Vec<usize> = findings.lost().into_iter().filter(|&r| r < world).collect();
    if lost.is_empty() {
        return Relaunch::SameRanks { kept: Vec::new() };
    }
    let ranks = world - lost.len();
    if ranks >= min_ranks.max(1) {
        Relaunch::Survivors { dropped: lost, ranks }
    } else {
        Relaunch::SameRanks { kept: lost }
    }
}

impl Relaunch {
    /// The number of ranks after this relaunch, from `world` before it.
    pub fn ranks(&self, world: usize) -> usize {
        match self {
            Self::SameRanks { .. } => world,
            Self::Survivors { ranks, .. } => *ranks,
        }
    }

    /// The launch command `argv` (of `world` ranks) for this relaunch: the launcher's rank count
    /// and every per-rank list of the job (`--device-memory`, `--speeds`, `--device`, with one
    /// entry per rank) without the dropped ranks.
    ///
    /// # Errors
    /// [`Error::Restart`] when ranks are dropped but the command's rank count cannot be found.
    pub fn rewrite(&self, argv: &[String], world: usize) -> Result<Vec<String>> {
        let Self::Survivors { dropped, ranks } = self else {
            return Ok(argv.to_vec());
        };
        let mut out = argv.to_vec();
        let at = rank_count_at(argv).ok_or_else(|| Error::Restart {
            reason: format!(
                "cannot find the number of ranks in `{}` to start again without rank(s) {dropped:?}: give it as \
                 `mpirun -np N`, `srun -n N` or the job's `--ranks N`",
                argv.join(" ")
            ),
        })?;
        match &mut out[at.word] {
            word if at.joined => *word = format!("{}={ranks}", word.split('=').next().unwrap_or_default()),
            word => *word = ranks.to_string(),
        }
        for (i, word) in argv.iter().enumerate() {
            let Some((flag, list)) = per_rank_list(argv, i, word) else {
                continue;
            };
            let entries: Vec<&str> = list.split(',').collect();
            if entries.len() != world {
                continue;
            }
            let kept: Vec<&str> = entries
                .iter()
                .enumerate()
                .filter(|(r, _)| !dropped.contains(r))
                .map(|(_, e)| *e)
                .collect();
            match flag {
                Some(flag) => out[i] = format!("{flag}={}", kept.join(",")),
                None => out[i] = kept.join(","),
            }
        }
        Ok(out)
    }

    /// `CUDA_VISIBLE_DEVICES` (`visible`) for this relaunch, when it lists one device per rank
    /// (`world` of them, on one host): without the dropped ranks' devices. `None`: unchanged.
    pub fn visible_devices(&self, visible: &str, world: usize) -> Option<String> {
        let Self::Survivors { dropped, .. } = self else {
            return None;
        };
        let devices: Vec<&str> = visible.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
        (devices.len() == world).then(|| {
            devices
                .iter()
                .enumerate()
                .filter(|(r, _)| !dropped.contains(r))
                .map(|(_, d)| *d)
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

/// Per-rank options of ballast's jobs: one comma-separated entry per rank.
const PER_RANK_LISTS: [&str; 3] = ["--device-memory", "--speeds", "--device"];

/// When word `i` of `argv` is the value of a per-rank list: `Some((Some(flag), list))` for
/// `--flag=list`, `Some((None, list))` for a value after `--flag`.
fn per_rank_list<'a>(argv: &[String], i: usize, word: &'a str) -> Option<(Option<&'a str>, &'a str)> {
    if let Some((flag, list)) = word.split_once('=') {
        return PER_RANK_LISTS.contains(&flag).then_some((Some(flag), list));
    }
    let previous = argv.get(i.checked_sub(1)?)?;
    PER_RANK_LISTS.contains(&previous.as_str()).then_some((None, word))
}

/// Where a command's rank count is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RankCountAt {
    /// The word holding the number.
    word: usize,
    /// `--flag=N` (the number after `=` in that word) rather than `--flag N`.
    joined: bool,
}

/// The words that give the number of ranks: `mpirun`/`mpiexec` `-np`, `-n`, `--np`, `-c`;
/// `srun` `-n`, `--ntasks`; a job started without a launcher, `--ranks` (ranks as threads).
fn rank_count_flags(launcher: &str) -> &'static [&'static str] {
    match launcher {
        "mpirun" | "mpiexec" | "orterun" | "prterun" => &["-np", "-n", "--np", "-c"],
        "srun" => &["-n", "--ntasks"],
        _ => &["--ranks"],
    }
}

/// The first word of `argv` that gives its number of ranks (see [`rank_count_flags`]); the
/// launcher's options come before the program's, so the first match is the launcher's.
fn rank_count_at(argv: &[String]) -> Option<RankCountAt> {
    let launcher = std::path::Path::new(argv.first()?).file_name()?.to_str()?;
    let flags = rank_count_flags(launcher);
    for (i, word) in argv.iter().enumerate().skip(1) {
        if let Some((flag, value)) = word.split_once('=') {
            if flags.contains(&flag) && value.parse::<usize>().is_ok() {
                return Some(RankCountAt { word: i, joined: true });
            }
        } else if flags.contains(&word.as_str()) && argv.get(i + 1).is_some_and(|v| v.parse::<usize>().is_ok()) {
            return Some(RankCountAt {
                word: i + 1,
                joined: false,
            });
        }
    }
    None
}

/// The number of ranks `argv` starts, when it says.
pub fn ranks_of(argv: &[String]) -> Option<usize> {
    let at = rank_count_at(argv)?;
    let word = &argv[at.word];
    let value = if at.joined { word.split_once('=')?.1 } else { word };
    value.parse().ok()
}

/// The job's checkpoint directory, from `--checkpoint-dir DIR` or `--checkpoint-dir=DIR`.
pub fn checkpoint_dir(argv: &[String]) -> Option<PathBuf> {
    argv.iter()
        .enumerate()
        .find_map(|(i, word)| match word.split_once('=') {
            Some(("--checkpoint-dir", dir)) => Some(PathBuf::from(dir)),
            _ if word == "--checkpoint-dir" => argv.get(i + 1).map(PathBuf::from),
            _ => None,
        })
}

/// `argv` with the job's `--resume` flag present (`resume`) or absent: a job starts again from
/// its newest checkpoint when there is one, and from step 0 when there is none.
pub fn with_resume(argv: &[String], resume: bool) -> Vec<String> {
    let mut out: Vec<String> = argv.iter().filter(|w| *w != "--resume").cloned().collect();
    if resume {
        out.push("--resume".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_launchers_rank_count_is_rewritten_and_the_jobs_per_rank_lists_lose_the_dropped_ranks() {
        let drop_1 = Relaunch::Survivors {
            dropped: vec![1],
            ranks: 2,
        };
        let cases = [
            (
                "mpirun --oversubscribe -np 3 resnet --speeds 3,2,1 --steps 9",
                "mpirun --oversubscribe -np 2 resnet --speeds 3,1 --steps 9",
            ),
            ("mpiexec -n 3 ballast demo", "mpiexec -n 2 ballast demo"),
            (
                "/usr/bin/srun --ntasks=3 resnet --device=cuda:0,cuda:1,cuda:2",
                "/usr/bin/srun --ntasks=2 resnet --device=cuda:0,cuda:2",
            ),
            (
                "resnet --ranks 3 --device-memory 1GiB,2GiB,3GiB",
                "resnet --ranks 2 --device-memory 1GiB,3GiB",
            ),
            // A list that is not one entry per rank stays as it is.
            (
                "srun -n 3 resnet --device-memory 1GiB",
                "srun -n 2 resnet --device-memory 1GiB",
            ),
        ];
        for (before, after) in cases {
            assert_eq!(drop_1.rewrite(&words(before), 3).unwrap(), words(after), "{before}");
        }
        let same = Relaunch::SameRanks { kept: vec![] };
        assert_eq!(
            same.rewrite(&words("mpirun -np 3 x"), 3).unwrap(),
            words("mpirun -np 3 x")
        );
        let err = drop_1.rewrite(&words("mpirun x --steps 3"), 3).unwrap_err();
        assert!(err.to_string().contains("cannot find the number of ranks"), "{err}");
        assert_eq!(ranks_of(&words("mpirun --np=4 x")), Some(4));
        assert_eq!(ranks_of(&words("srun -n 5 x -n 7")), Some(5));
    }

    #[test]
    fn ranks_that_died_are_dropped_while_enough_survive_and_stalled_ones_are_kept() {
        let died = |r: Vec<usize>| Findings {
            exited: r,
            ..Findings::default()
        };
        assert_eq!(
            decide(3, 2, &died(vec![2])),
            Relaunch::Survivors {
                dropped: vec![2],
                ranks: 2
            }
        );
        assert_eq!(decide(3, 3, &died(vec![2])), Relaunch::SameRanks { kept: vec![2] });
        assert_eq!(
            decide(3, 2, &died(vec![0, 2])),
            Relaunch::SameRanks { kept: vec![0, 2] }
        );
        let stalled = Findings {
            stalled: vec![1],
            ..Findings::default()
        };
        assert_eq!(decide(3, 1, &stalled), Relaunch::SameRanks { kept: vec![] });
        let host_lost = Findings {
            unreported_elsewhere: vec![2, 3],
            ..Findings::default()
        };
        assert_eq!(
            decide(4, 2, &host_lost),
            Relaunch::Survivors {
                dropped: vec![2, 3],
                ranks: 2
            }
        );
    }

    #[test]
    fn visible_devices_lose_the_dropped_ranks_only_when_one_per_rank() {
        let drop_0 = Relaunch::Survivors {
            dropped: vec![0],
            ranks: 2,
        };
        assert_eq!(drop_0.visible_devices("4,5,6", 3).as_deref(), Some("5,6"));
        assert_eq!(drop_0.visible_devices("4,5", 3), None);
        assert_eq!(Relaunch::SameRanks { kept: vec![] }.visible_devices("4,5,6", 3), None);
    }

    #[test]
    fn resume_and_checkpoint_dir_are_read_and_set() {
        let argv = words("mpirun -np 3 resnet --checkpoint-dir ck --resume --steps 9");
        assert_eq!(checkpoint_dir(&argv), Some(PathBuf::from("ck")));
        assert_eq!(
            checkpoint_dir(&words("x --checkpoint-dir=/a/b")),
            Some(PathBuf::from("/a/b"))
        );
        assert_eq!(
            with_resume(&argv, false),
            words("mpirun -np 3 resnet --checkpoint-dir ck --steps 9")
        );
        assert_eq!(
            with_resume(&argv, true),
            words("mpirun -np 3 resnet --checkpoint-dir ck --steps 9 --resume")
        );
    }
}
