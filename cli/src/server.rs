//! Finding and running a local nats-server (for `taskmesh dev` and `taskmesh bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// The oldest nats-server taskmesh runs on (message schedules, consumer pause).
const MIN_VERSION: (u32, u32) = (2, 12);

/// Finds a nats-server: `NATS_SERVER_BIN`, `.tools/bin/nats-server` in this directory or
/// above the executable (a checkout), else `nats-server` on PATH; checks its version.
pub(crate) fn find_nats_server() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        check_version(&p).with_context(|| format!("NATS_SERVER_BIN={}", p.display()))?;
        return Ok(p);
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|d| d.join(".tools/bin/nats-server")));
    }
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().map(|d| d.join(".tools/bin/nats-server")));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut seen_old = Vec::new();
    for c in candidates.iter().filter(|c| c.is_file()) {
        match check_version(c) {
            Ok(()) => return Ok(c.clone()),
            Err(e) => seen_old.push(format!("{}: {e}", c.display())),
        }
    }
    bail!(
        "no nats-server {}.{}+ found{}: run `scripts/ensure-nats-server.sh` (installs the pinned \
         build into .tools/bin) or set NATS_SERVER_BIN",
        MIN_VERSION.0,
        MIN_VERSION.1,
        if seen_old.is_empty() {
            String::new()
        } else {
            format!(" ({})", seen_old.join("; "))
        }
    )
}

fn check_version(bin: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|s| s.contains('.'))
        .unwrap_or("");
    let mut it = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (maj, min) < MIN_VERSION {
        bail!(
            "version {v:?} is too old (need {}.{}+)",
            MIN_VERSION.0,
            MIN_VERSION.1
        );
    }
    Ok(())
}

/// A nats-server child process; killed when dropped.
#[derive(Debug)]
pub(crate) struct LocalServer {
    child: Child,
    /// `nats://127.0.0.1:<port>`.
    pub(crate) url: String,
}

impl LocalServer {
    /// Starts nats-server with JetStream on `127.0.0.1:port` storing under `dir`, and waits
    /// until it accepts connections.
    pub(crate) async fn start(dir: &Path, port: u16, sync_always: bool) -> anyhow::Result<Self> {
        let bin = find_nats_server()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "port {port} on 127.0.0.1 is in use: is another `taskmesh dev` running? choose another with --port"
            );
        }
        let store = dir.join("jetstream");
        let conf = dir.join("nats-server.conf");
        let log = dir.join("nats-server.log");
        let sync = if sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "server_name: taskmesh-dev\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{mport}\nmax_payload: 2MB\n\
                 jetstream {{\n  store_dir: {store:?}{sync}\n}}\nlog_file: {log:?}\n",
                mport = port.saturating_add(4000)
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "nats-server did not start within 10s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, url })
    }

    /// The server's process id (while it runs).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it.
    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}
