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

/// Where the launcher places the ranks, rewritten for the survivors: the host list in the
/// command, and the hostfile it names, whose new text the caller writes elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The command with its host list (`--host`, `-H`; `srun -w`, `--nodelist`) holding each
    /// host as many times as it keeps ranks (`host:N`), hosts left with none taken out.
    pub argv: Vec<String>,
    /// The hostfile (`--hostfile`, `--machinefile`): the word of `argv` holding its path, and
    /// the survivors' slots per host, to write with [`hostfile_for`].
    pub hostfile: Option<(usize, Vec<(String, usize)>)>,
}

impl Relaunch {
    /// The launcher's placement of the survivors, from `rank_hosts` (every rank's host name,
    /// by rank, as the ranks gathered them): each host keeps as many slots as it keeps ranks,
    /// so that a launcher that fills hosts in order (Open MPI's and Slurm's default) puts every
    /// surviving rank where its per-rank entries (`--device`, `CUDA_VISIBLE_DEVICES`) say. The
    /// command is unchanged when nothing is dropped, when the hosts are not known, or when a
    /// host of the list matches none of `rank_hosts` (a name ballast cannot tell).
    pub fn placement(&self, argv: &[String], rank_hosts: &[String]) -> Placement {
        let unchanged = Placement {
            argv: argv.to_vec(),
            hostfile: None,
        };
        let (Self::Survivors { dropped, .. }, Some((start, launcher))) = (self, launcher_at(argv)) else {
            return unchanged;
        };
        if rank_hosts.is_empty() {
            return unchanged;
        }
        let mut kept: Vec<(String, usize)> = Vec::new();
        for (rank, host) in rank_hosts.iter().enumerate() {
            let at = kept.iter().position(|(h, _)| h == host).unwrap_or_else(|| {
                kept.push((host.clone(), 0));
                kept.len() - 1
            });
            kept[at].1 += usize::from(!dropped.contains(&rank));
        }
        let mut out = unchanged;
        let slurm = launcher == "srun";
        let (list_flags, file_flags): (&[&str], &[&str]) = if slurm {
            (&["-w", "--nodelist"], &[])
        } else {
            (
                &["--host", "-H", "--hosts", "-host"],
                &["--hostfile", "--machinefile", "-hostfile", "-machinefile"],
            )
        };
        for i in start + 1..argv.len() {
            let word = argv[i].as_str();
            let (flag, value, joined) = match word.split_once('=') {
                Some((flag, value)) if flag.starts_with('-') => (flag, value, true),
                _ => match argv.get(i.wrapping_sub(1)) {
                    Some(previous) if i > start + 1 => (previous.as_str(), word, false),
                    _ => continue,
                },
            };
            if list_flags.contains(&flag) {
                let Some(list) = host_list(value, &kept, slurm) else {
                    continue;
                };
                out.argv[i] = if joined { format!("{flag}={list}") } else { list };
            } else if file_flags.contains(&flag) && !joined {
                out.hostfile = Some((i, kept.clone()));
            }
        }
        out
    }
}

/// Whether host name `a` (from a command or hostfile) and `b` (a rank's) are one host: equal,
/// or equal up to the domain.
fn same_host(a: &str, b: &str) -> bool {
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_string();
    a == b || short(a) == short(b)
}

/// The host list `value` (`a:2,b:2`, `a,a,b`) with each host's slots set to the ranks it
/// keeps (`kept`) and hosts that keep none left out; for Slurm, the names alone. `None` when a
/// host of the list is not among `kept`'s, or it is a Slurm range (`node[1-4]`).
fn host_list(value: &str, kept: &[(String, usize)], slurm: bool) -> Option<String> {
    let mut hosts: Vec<&str> = Vec::new();
    for entry in value.split(',') {
        let host = entry.split(':').next().unwrap_or(entry);
        if host.contains('[') || !kept.iter().any(|(k, _)| same_host(host, k)) {
            return None;
        }
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    let slots = |host: &str| {
        kept.iter()
            .filter(|(k, _)| same_host(host, k))
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    let list: Vec<String> = hosts
        .into_iter()
        .filter(|h| slots(h) > 0)
        .map(|h| {
            if slurm {
                h.to_string()
            } else {
                format!("{h}:{}", slots(h))
            }
        })
        .collect();
    Some(list.join(","))
}

/// A hostfile's text (`text`: `host slots=N ...` lines, `#` comments) for the survivors: each
/// host's `slots` set to the ranks it keeps (`kept`, from [`Placement::hostfile`]), and hosts
/// that keep none commented out. Hosts ballast cannot match to a rank keep their line.
pub fn hostfile_for(text: &str, kept: &[(String, usize)]) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let host = match fields.next() {
            Some(host) if !host.starts_with('#') => host,
            _ => {
                out.push_str(line);
                out.push('\n');
                continue;
            }
        };
        let slots: Option<usize> = kept.iter().find(|(k, _)| same_host(host, k)).map(|(_, n)| *n);
        match slots {
            None => out.push_str(line),
            Some(0) => out.push_str(&format!("# no rank left here (ballast launch): {line}")),
            Some(n) => {
                let rest: Vec<&str> = fields
                    .filter(|f| !f.starts_with("slots=") && !f.starts_with("max_slots="))
                    .collect();
                out.push_str(&format!("{host} slots={n}"));
                for f in rest {
                    out.push(' ');
                    out.push_str(f);
                }
            }
        }
        out.push('\n');
    }
    out
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

/// The launchers whose options ballast reads.
const LAUNCHERS: [&str; 5] = ["mpirun", "mpiexec", "orterun", "prterun", "srun"];

/// The launcher word of `argv` (its index and name): the first word naming one of
/// [`LAUNCHERS`], so that a wrapper before it (`nice`, `env`, a script that sets the network
/// up) keeps working; `None` for a job started without one.
fn launcher_at(argv: &[String]) -> Option<(usize, &str)> {
    argv.iter().enumerate().find_map(|(i, word)| {
        let name = std::path::Path::new(word).file_name()?.to_str()?;
        LAUNCHERS.contains(&name).then_some((i, name))
    })
}

/// The first word of `argv` that gives its number of ranks (see [`rank_count_flags`]); the
/// launcher's options come before the program's, so the first match is the launcher's.
fn rank_count_at(argv: &[String]) -> Option<RankCountAt> {
    let (start, launcher) = launcher_at(argv).unwrap_or((0, ""));
    let flags = rank_count_flags(launcher);
    for (i, word) in argv.iter().enumerate().skip(start + 1) {
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
    fn the_hosts_keep_as_many_slots_as_ranks_and_a_host_without_any_is_left_out() {
        let hosts: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let drop = |dropped: Vec<usize>| Relaunch::Survivors {
            ranks: 4 - dropped.len(),
            dropped,
        };
        let cases = [
            // Rank 1 of host a: host a keeps one slot, so rank 2 stays on host b.
            (
                vec![1],
                "mpirun --host a:2,b:2 -np 3 x",
                "mpirun --host a:1,b:2 -np 3 x",
            ),
            (vec![2, 3], "mpirun -H a,a,b,b -np 2 x", "mpirun -H a:2 -np 2 x"),
            (
                vec![0, 1],
                "mpirun --host=a.cluster:2,b.cluster:2 -np 2 x",
                "mpirun --host=b.cluster:2 -np 2 x",
            ),
            (vec![3], "srun -w a,b -n 3 x", "srun -w a,b -n 3 x"),
            (vec![2, 3], "srun --nodelist=a,b -n 2 x", "srun --nodelist=a -n 2 x"),
            // Names ballast cannot match, and Slurm ranges, stay as they are.
            (vec![3], "mpirun --host c:4 -np 3 x", "mpirun --host c:4 -np 3 x"),
            (vec![3], "srun -w node[1-2] -n 3 x", "srun -w node[1-2] -n 3 x"),
            // A wrapper before the launcher.
            (
                vec![2, 3],
                "nice mpirun -H a:2,b:2 -np 2 x",
                "nice mpirun -H a:2 -np 2 x",
            ),
        ];
        for (dropped, before, after) in cases {
            let placed = drop(dropped).placement(&words(before), &hosts);
            assert_eq!(placed.argv, words(after), "{before}");
            assert_eq!(placed.hostfile, None);
        }
        let placed = drop(vec![1]).placement(&words("mpirun --hostfile hf -np 3 x"), &hosts);
        let kept = vec![("a".to_string(), 1), ("b".to_string(), 2)];
        assert_eq!(placed.hostfile, Some((2, kept.clone())));
        assert_eq!(
            hostfile_for(
                "# the hosts\na slots=2 max_slots=4\nb.cluster slots=2\nc slots=8\n",
                &kept
            ),
            "# the hosts\na slots=1\nb.cluster slots=2\nc slots=8\n"
        );
        let none_on_a = vec![("a".to_string(), 0), ("b".to_string(), 2)];
        assert_eq!(
            hostfile_for("a slots=2\nb\n", &none_on_a),
            "# no rank left here (ballast launch): a slots=2\nb slots=2\n"
        );
        // Nothing dropped, or hosts unknown: unchanged.
        let same = Relaunch::SameRanks { kept: vec![] };
        assert_eq!(
            same.placement(&words("mpirun -H a,b x"), &hosts).argv,
            words("mpirun -H a,b x")
        );
        assert_eq!(
            drop(vec![1]).placement(&words("mpirun -H a,b x"), &[]).argv,
            words("mpirun -H a,b x")
        );
        assert_eq!(
            ranks_of(&words("scripts/two-hosts.sh mpirun -np 3 x --ranks 9")),
            Some(3)
        );
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
