//! `whittle deploy` on an ssh target, for real: an OpenSSH server started by the test on
//! 127.0.0.1 (its own host key, config and authorized key in a temporary folder), a target TOML
//! with that port, key and known_hosts, and the host's runner copied over with scp and started
//! through ssh. The board is this machine (triple `host`), so the runner's output checksums must
//! equal those of the host's runner run directly. A changed host key, an unknown host, a refused
//! key and a closed port each end the run with one line naming the cause, before any report.
//!
//! Needs /usr/sbin/sshd and the OpenSSH client (`just setup-ssh`) and ONNX Runtime (`just
//! setup`). Without them the tests are skipped, or fail when `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const SSHD: &str = "/usr/sbin/sshd";

/// What is missing to run sshd and ssh here, if anything; `None` when all is there.
fn missing() -> Option<String> {
    let mut gone = Vec::new();
    if !Path::new(SSHD).is_file() {
        gone.push(SSHD.to_string());
    }
    for tool in ["ssh", "scp", "ssh-keygen", "ssh-keyscan"] {
        if !installed(tool, "-?") {
            gone.push(tool.to_string());
        }
    }
    missing_and_ort(gone)
}

/// True when the test should go on (see [`common::ready`]).
fn ready() -> bool {
    crate::common::ready(missing(), "just setup-ssh")
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A new ed25519 key pair at `path` (and `path.pub`).
fn keygen(path: &Path) {
    sh(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-f", &s(path)],
    );
}

/// An sshd on 127.0.0.1 with its own keys in a temporary folder; killed on drop.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
    user: String,
}

impl Sshd {
    fn start() -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_ed25519"));
        keygen(&d.join("client_ed25519"));
        std::fs::copy(d.join("client_ed25519.pub"), d.join("authorized_keys")).unwrap();
        // sshd refuses to start without its privilege separation folder.
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = sh("id", &["-un"]).trim().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = d.join("sshd_config");
        let text = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n",
            d = s(d)
        );
        std::fs::write(&cfg, text).unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f", &s(&cfg)])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{SSHD}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "sshd exited ({status}): {}",
                    std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            dir,
            port,
            child,
            user,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server's known_hosts line, from ssh-keyscan.
    fn known_hosts_line(&self) -> String {
        let line = sh(
            "ssh-keyscan",
            &["-p", &self.port.to_string(), "-t", "ed25519", "127.0.0.1"],
        );
        let line = line
            .lines()
            .find(|l| !l.starts_with('#') && l.contains("ssh-ed25519"))
            .unwrap_or_else(|| panic!("ssh-keyscan printed no key: {line:?}"))
            .to_string();
        assert!(
            line.starts_with(&format!("[127.0.0.1]:{} ", self.port)),
            "{line}"
        );
        line
    }

    /// A target TOML for this server, written beside it as `<name>.toml`.
    fn target(&self, name: &str, known_hosts: &str, identity: &Path, port: u16) -> PathBuf {
        let kh = self.path(&format!("{name}.known_hosts"));
        std::fs::write(&kh, format!("{known_hosts}\n")).unwrap();
        let lib = locate_ort_library().expect("ONNX Runtime");
        let toml = format!(
            "name = \"{name}\"\ntriple = \"host\"\nnotes = \"sshd on 127.0.0.1 started by tests/deploy_ssh.rs\"\ntransport = \"ssh\"\nruntimes = [\"ort-cpu\"]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{}\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\nremote_dir = \"{}\"\nort_library = \"{}\"\n",
            self.user,
            s(identity),
            s(&kh),
            s(&self.path("board")),
            s(&lib),
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `whittle deploy --target <toml> --iters 5 --warmup 1 --reports <reports>` from the repository
/// root, with the runner found beside `whittle`.
fn deploy(target: &Path, reports: &Path) -> Run {
    let args = deploy_args(&s(target), 5, reports, &[]);
    run_env(None, &args, &[("WHITTLE_RUNNER", None)])
}

#[test]
fn deploy_over_ssh_runs_ort_cpu_and_matches_the_host_runner() {
    if !ready() {
        return;
    }
    let sshd = Sshd::start();
    let target = sshd.target(
        "ssh-loopback",
        &sshd.known_hosts_line(),
        &sshd.path("client_ed25519"),
        sshd.port,
    );
    let reports = sshd.path("reports");
    let r = deploy(&target, &reports).ok();
    // the main job's search timed its candidates on the board: the original and the choice
    let rows = r.rows("resnet8_cifar10");
    assert_eq!(rows.len(), 2, "{}", r.dump());
    r.stdout_has("(chosen)");
    let board = sshd.path("board");
    assert!(
        r.stderr.contains(&format!(
            "runner: ssh -p {} {}@127.0.0.1 -- {}/whittle-runner",
            sshd.port,
            sshd.user,
            s(&board)
        )),
        "stderr should name the ssh command\n{}",
        r.dump()
    );

    // What scp put on the "board": the runner (executable) and the models.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(board.join("whittle-runner"))
            .unwrap_or_else(|e| panic!("runner on the board: {e}\n{}", r.dump()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "runner mode {mode:o}");
    }
    assert!(board.join("resnet8_cifar10.onnx").is_file(), "{}", r.dump());
    assert!(
        board.join("resnet8_cifar10.auto.onnx").is_file(),
        "{}",
        r.dump()
    );
    // every candidate went to the board to be timed there
    assert!(board.join("candidate-0.onnx").is_file(), "{}", r.dump());

    // A second run over the first one's files (the runner and models are replaced; as root this
    // does not show that a read-only copy is replaced for another user).
    let r2 = deploy(&target, &sshd.path("reports-2")).ok();
    assert_eq!(
        r2.stdout
            .lines()
            .filter(|l| l.starts_with("resnet8_cifar10"))
            .count(),
        2,
        "{}",
        r2.dump()
    );

    let report = &report_dir(&reports.join("ssh-loopback"), &r);
    let results = results_json(report);
    assert_eq!(results["target"].as_str(), Some("ssh-loopback"));
    assert_eq!(results["transport"].as_str(), Some("ssh"));
    assert_eq!(results["complete"], true);
    assert!(results.get("timing_note").is_none(), "{results:#}");
    let search = &results["auto"];
    assert!(
        search["runtime"]
            .as_str()
            .is_some_and(|r| r.contains("ssh-loopback (ssh)")),
        "the search says where it measured\n{search:#}"
    );
    assert!(
        search["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["latency"]["speedup"].as_f64().is_some()),
        "{search:#}"
    );

    let lib = locate_ort_library().expect("ONNX Runtime");
    assert_rows_match_host_runner(report, &results, &s(&lib), 1e-6, "over ssh");
}

/// Runs deploy on a target that cannot be reached and checks the one-line error: exit 2, `want`
/// in it, and no report folder.
fn refused(sshd: &Sshd, target: &Path, want: &str) {
    let reports = sshd.path("reports-refused");
    let r = deploy(target, &reports);
    assert_eq!(r.code, 2, "{}", r.dump());
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr\n{}", r.dump());
    assert!(lines[0].starts_with("error: ssh "), "{}", r.dump());
    assert!(
        lines[0].to_lowercase().contains(want),
        "expected {want:?}\n{}",
        r.dump()
    );
    assert!(r.stdout.is_empty(), "{}", r.dump());
    assert!(
        !reports.exists(),
        "nothing was measured, so no report folder\n{}",
        r.dump()
    );
}

#[test]
fn unreachable_ssh_targets_fail_with_one_line_naming_the_cause() {
    if !ready() {
        return;
    }
    let sshd = Sshd::start();
    let good = sshd.known_hosts_line();
    let key = sshd.path("client_ed25519");

    // A changed host key: known_hosts holds another key for [127.0.0.1]:port.
    keygen(&sshd.path("other_host"));
    let other = std::fs::read_to_string(sshd.path("other_host.pub")).unwrap();
    let other_key: Vec<&str> = other.split_whitespace().take(2).collect();
    let wrong = format!("[127.0.0.1]:{} {}", sshd.port, other_key.join(" "));
    let t = sshd.target("changed-key", &wrong, &key, sshd.port);
    refused(&sshd, &t, "host key verification failed");
    refused(&sshd, &t, "is not the one");

    // An unknown host: known_hosts has nothing for it.
    let t = sshd.target("unknown-host", "", &key, sshd.port);
    refused(&sshd, &t, "host key verification failed");
    refused(&sshd, &t, "is not in");

    // A key the server does not accept.
    keygen(&sshd.path("stranger"));
    let t = sshd.target("bad-key", &good, &sshd.path("stranger"), sshd.port);
    refused(&sshd, &t, "permission denied (publickey)");

    // Nothing listening on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = sshd.target("closed-port", &good, &key, closed);
    refused(&sshd, &t, "connection refused");

    // Nothing was copied anywhere.
    assert!(!sshd.path("board").exists());
}

#[test]
fn auto_times_its_candidates_on_an_ssh_board() {
    if !ready() {
        return;
    }
    let sshd = Sshd::start();
    let key = sshd.path("client_ed25519");
    let target = sshd.target("ssh-loopback", &sshd.known_hosts_line(), &key, sshd.port);
    let out = sshd.path("chosen.onnx");
    let args = argv(
        "auto {} -o {} --calib {} --profile resnet8 --target {} --min-agreement 0.9 --budget 1s --rounds 3 --json",
        &[&resnet8(), &out, &cifar10(), &target],
    );
    let r = run_env(None, &args, &[("WHITTLE_RUNNER", None)])
        .ok()
        .json();
    assert!(
        r["runtime"]
            .as_str()
            .is_some_and(|w| w.contains("ssh-loopback (ssh), ort-cpu")),
        "{r}"
    );
    let timed: Vec<&serde_json::Value> = r["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["latency"]["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0))
        .collect();
    assert!(!timed.is_empty(), "{r}");
    // the original and each timed candidate went to the board
    for k in 0..=timed.len() {
        assert!(
            sshd.path("board")
                .join(format!("candidate-{k}.onnx"))
                .is_file(),
            "candidate {k}\n{r}"
        );
    }
    assert!(out.is_file());

    // a board that cannot be reached fails in one line before any compression
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = sshd.target("closed-port", &sshd.known_hosts_line(), &key, closed);
    let none = sshd.path("none.onnx");
    let args = argv(
        "auto {} -o {} --calib {} --profile resnet8 --target {} --min-agreement 0.9",
        &[&resnet8(), &none, &cifar10(), &t],
    );
    let r = run_env(None, &args, &[("WHITTLE_RUNNER", None)]);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line\n{}", r.dump());
    assert!(lines[0].contains("connection refused"), "{}", r.dump());
    assert!(!none.exists() && !sshd.path("none.auto").exists());
}
