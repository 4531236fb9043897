//! Lost ranks: a rank killed with SIGKILL or stopped with SIGSTOP in the middle of training
//! never leaves the others hanging. Run with `cargo test --release -p ballast --features mpi fault`.
#![cfg(feature = "mpi")]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const LIMIT: Duration = Duration::from_secs(30);

fn start_job(dir: &Path, envs: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "3"]);
    // Heartbeats inside the trial's directory: a killed rank cannot remove its file, and the
    // trial's clean-up then removes them with the rest.
    cmd.args([
        "-x",
        &format!("BALLAST_HEARTBEAT_DIR={}", dir.join("heartbeat").display()),
    ]);
    for (k, v) in envs {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(ballast_tests::bin("ballast-selftest"))
        .args([
            "balance",
            "--steps",
            "1000000",
            "--global-batch",
            "24",
            "--width",
            "64",
            "--out-dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun")
}

fn pids(dir: &Path) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<u32> = (0..3)
            .filter_map(|r| {
                std::fs::read_to_string(dir.join(format!("rank-{r}.pid")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect();
        if found.len() == 3 {
            return found;
        }
        assert!(Instant::now() < deadline, "ranks never started");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Waits for the job; returns (exit code, seconds after the fault, all output).
fn finish(mut child: Child, since: Instant, all: &[u32]) -> (Option<i32>, f64, String) {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let elapsed = since.elapsed().as_secs_f64();
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // Every rank process is gone too.
            let deadline = Instant::now() + Duration::from_secs(5);
            while all.iter().any(|&p| alive(p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let left: Vec<u32> = all.iter().copied().filter(|&p| alive(p)).collect();
            for &p in &left {
                let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
            }
            assert!(left.is_empty(), "rank processes {left:?} outlived mpirun");
            return (status.code(), elapsed, text);
        }
        if since.elapsed() > LIMIT + Duration::from_secs(10) {
            // What every rank and its threads were doing, so a hang explains itself.
            let mut states: Vec<String> = all.iter().map(|&p| process_state(p)).collect();
            states.push(format!("mpirun {}", process_state(child.id())));
            for &p in all {
                let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
            }
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the job hung for {:?} after the fault\nrank processes:\n{}\noutput:\n{}{}",
                since.elapsed(),
                states.join("\n"),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process's state and, per thread, its name, state and kernel wait channel.
fn process_state(pid: u32) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let mut lines = vec![format!("pid {pid}: {}", read(format!("/proc/{pid}/stat")))];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let t = task.path();
            let stat = read(t.join("stat").display().to_string());
            let state = stat
                .rsplit(") ")
                .next()
                .and_then(|s| s.split(' ').next())
                .unwrap_or("?");
            lines.push(format!(
                "  thread {:?} {} state {state} wchan {}",
                task.file_name(),
                read(t.join("comm").display().to_string()),
                read(t.join("wchan").display().to_string())
            ));
        }
    }
    lines.join("\n")
}

fn trial_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ballast-fault-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Delay before the fault: 0.3–1.5 s into training, varied per trial (deterministic).
fn delay(trial: u64) -> Duration {
    let x = trial
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407)
        >> 33;
    Duration::from_millis(300 + x % 1200)
}

#[test]
fn fault_kill9_of_any_rank_ends_the_job() {
    let _one_at_a_time = ballast_tests::one_job();
    for victim in 0..3usize {
        for trial in 0..5u64 {
            let dir = trial_dir(&format!("kill-{victim}-{trial}"));
            let child = start_job(&dir, &[]);
            let all = pids(&dir);
            std::thread::sleep(delay(trial * 3 + victim as u64));
            signal(all[victim], "-9");
            let (code, secs, text) = finish(child, Instant::now(), &all);
            println!("kill -9 rank {victim}, trial {trial}: exit {code:?} after {secs:.1}s");
            assert_ne!(code, Some(0), "{text}");
            assert!(secs < LIMIT.as_secs_f64(), "took {secs}s\n{text}");
            // ballast's own words, from the ranks the launcher stopped (not Open MPI's "process
            // rank N" line).
            assert!(
                text.contains(&format!(
                    "stopped by the launcher (SIGTERM): rank(s) [{victim}] exited before it"
                )),
                "a surviving rank must name rank {victim}:\n{text}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn fault_sigstop_is_a_timeout_naming_the_rank() {
    let _one_at_a_time = ballast_tests::one_job();
    for victim in 0..3usize {
        for trial in 0..2u64 {
            let dir = trial_dir(&format!("stop-{victim}-{trial}"));
            let child = start_job(&dir, &[("BALLAST_TIMEOUT_SECS", "3")]);
            let all = pids(&dir);
            std::thread::sleep(delay(trial * 7 + victim as u64));
            signal(all[victim], "-STOP");
            let (code, secs, text) = finish(child, Instant::now(), &all);
            println!("SIGSTOP rank {victim}, trial {trial}: exit {code:?} after {secs:.1}s");
            assert_ne!(code, Some(0), "{text}");
            assert!(secs < LIMIT.as_secs_f64(), "took {secs}s\n{text}");
            let named = text.contains(&format!("rank(s) [{victim}] never arrived"))
                || text.contains(&format!("rank(s) [{victim}] stopped responding"));
            assert!(named, "the message must name rank {victim}:\n{text}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Runs the collectives self-test on 2 ranks with their heartbeats in `heartbeat_dir`.
fn selftest_with_heartbeats(heartbeat_dir: &Path) -> std::process::Output {
    let dir = heartbeat_dir.display().to_string();
    ballast::testing::launch::mpirun(
        &ballast_tests::bin("ballast-selftest"),
        None,
        2,
        &["collectives"],
        &[("BALLAST_HEARTBEAT_DIR", &dir)],
    )
}

/// Asserts that the job was refused with ballast's message naming `reason`, with exit code 2.
fn assert_refused(out: &std::process::Output, path: &Path, reason: &str) {
    let text = ballast::testing::launch::output_text(out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let message = format!("the heartbeat directory {} is refused on rank", path.display());
    assert!(text.contains(&message), "no refusal naming {}:\n{text}", path.display());
    assert!(text.contains(reason), "the refusal must say {reason:?}:\n{text}");
    assert!(
        text.contains("set BALLAST_HEARTBEAT_DIR"),
        "the refusal must name the fix:\n{text}"
    );
}

#[test]
fn fault_heartbeat_directory_planted_as_a_link_is_refused() {
    let dir = trial_dir("heartbeat-link");
    let target = dir.join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    let link = dir.join("heartbeat");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = selftest_with_heartbeats(&link);
    assert_refused(&out, &link, &format!("it is a symbolic link (to {})", target.display()));
    let written: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
    assert!(written.is_empty(), "files were written through the link: {written:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fault_heartbeat_directory_open_to_others_or_of_another_user_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = trial_dir("heartbeat-loose");
    let loose = dir.join("heartbeat");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = selftest_with_heartbeats(&loose);
    assert_refused(&out, &loose, "its mode is 0777, open to other users");
    assert_eq!(std::fs::read_dir(&loose).unwrap().count(), 0, "files were written");
    // Another user's directory: as root one handed to `nobody`, else one that root owns.
    let me = std::fs::metadata(&dir).unwrap().uid();
    let foreign = if me == 0 {
        let foreign = dir.join("theirs");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        foreign
    } else {
        PathBuf::from("/")
    };
    let out = selftest_with_heartbeats(&foreign);
    assert_refused(&out, &foreign, "not to this process's user");
    if me == 0 {
        assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 0, "files were written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
