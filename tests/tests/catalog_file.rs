//! `file` tasks against real directories and a real JetStream Object Store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog_common;

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use catalog_common::{Mesh, age_file};
use futures::StreamExt;
use serde_json::json;
use sha2::Digest;
use taskmesh_shared::TaskState;
use taskmesh_workers::catalog::Settings;

#[tokio::test]
async fn cleanup_temp_files_removes_old_files_only_and_refuses_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    for (name, size) in [("old1", 10), ("sub/old2", 20), ("fresh", 5)] {
        std::fs::write(tmp.path().join(name), vec![b'x'; size]).unwrap();
    }
    age_file(&tmp.path().join("old1"), Duration::from_secs(7200));
    age_file(&tmp.path().join("sub/old2"), Duration::from_secs(7200));
    std::fs::write(outside.path().join("precious"), b"p").unwrap();
    age_file(&outside.path().join("precious"), Duration::from_secs(7200));
    std::os::unix::fs::symlink(outside.path(), tmp.path().join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("precious"), tmp.path().join("ln")).unwrap();

    let mut s = Settings::empty();
    s.temp_dirs = vec![tmp.path().to_path_buf()];
    s.temp_max_age = Duration::from_secs(3600);
    let mesh = Mesh::start(s).await;

    let dry = mesh
        .run_ok("file.cleanup_temp_files", json!({"dry_run": true}))
        .await;
    assert_eq!(dry["files_removed"], 2);
    assert!(tmp.path().join("old1").exists());
    let r = mesh.run_ok("file.cleanup_temp_files", json!({})).await;
    assert_eq!(r["files_removed"], 2, "{r}");
    assert_eq!(r["bytes_freed"], 30);
    assert_eq!(r["errors"], json!([]));
    assert!(!tmp.path().join("old1").exists() && !tmp.path().join("sub/old2").exists());
    assert!(tmp.path().join("fresh").exists());
    assert!(
        outside.path().join("precious").exists(),
        "symlinks are never followed"
    );
    assert!(tmp.path().join("ln").symlink_metadata().is_ok());

    // Refused roots and bad arguments are permanent.
    mesh.expect_bad_args("file.cleanup_temp_files", json!({"dirs": ["/"]}), "dirs[0]")
        .await;
    let home = std::env::var("HOME").unwrap();
    mesh.expect_bad_args(
        "file.cleanup_temp_files",
        json!({"dirs": [home]}),
        "dirs[0]",
    )
    .await;
    mesh.expect_bad_args(
        "file.cleanup_temp_files",
        json!({"dirs": ["tmp"]}),
        "dirs[0]",
    )
    .await;
    mesh.expect_bad_args(
        "file.cleanup_temp_files",
        json!({"max_age_secs": -1}),
        "invalid value",
    )
    .await;

    // Retry path: a directory that is not there yet.
    let later = tmp.path().join("later");
    let id = mesh
        .enqueue(
            "file.cleanup_temp_files",
            json!({"dirs": [later], "max_age_secs": 0}),
        )
        .await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    std::fs::create_dir(&later).unwrap();
    std::fs::write(later.join("f"), b"abc").unwrap();
    age_file(&later.join("f"), Duration::from_secs(5));
    let done = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(done.result.unwrap()["files_removed"], 1);
}

#[tokio::test]
async fn nothing_configured_means_skipped() {
    let mesh = Mesh::start(Settings::empty()).await;
    for task in [
        "file.cleanup_temp_files",
        "file.backup_user_data",
        "file.sync_cloud_storage",
    ] {
        let r = mesh.run_ok(task, json!({})).await;
        assert!(r["skipped"].is_string(), "{task}: {r}");
    }
}

#[tokio::test]
async fn backup_user_data_writes_a_verifiable_archive_with_retention() {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("docs")).unwrap();
    std::fs::write(src.path().join("docs/a.txt"), b"alpha").unwrap();
    std::fs::write(src.path().join("b.bin"), vec![7u8; 10_000]).unwrap();
    let dest_root = tempfile::tempdir().unwrap();
    let dest = dest_root.path().join("backups");
    let mut s = Settings::empty();
    s.backup_sources = vec![src.path().to_path_buf()];
    s.backup_dest = Some(dest.clone());
    s.backup_keep = 2;
    let mesh = Mesh::start(s).await;

    // Retry path: the backup volume is not mounted yet.
    let id = mesh.enqueue("file.backup_user_data", json!({})).await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    std::fs::create_dir(&dest).unwrap();
    let r = mesh
        .wait_state(&id, TaskState::Succeeded)
        .await
        .result
        .unwrap();
    assert_eq!(r["files"], 2, "{r}");
    assert_eq!(r["bytes"], 10_005);
    let archive = std::path::PathBuf::from(r["archive"].as_str().unwrap());
    let bytes = std::fs::read(&archive).unwrap();
    assert_eq!(r["size"], bytes.len());
    let sum = format!("{:x}", sha2::Sha256::digest(&bytes));
    assert_eq!(r["sha256"], sum);
    let sidecar = std::fs::read_to_string(format!("{}.sha256", archive.display())).unwrap();
    assert!(sidecar.starts_with(&sum));
    // Unpack and check every file against the manifest.
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut files = BTreeMap::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        files.insert(name, content);
    }
    let manifest = String::from_utf8(files.remove("MANIFEST.sha256").unwrap()).unwrap();
    assert_eq!(manifest.lines().count(), 2);
    for line in manifest.lines() {
        let (hash, name) = line.split_once("  ").unwrap();
        assert_eq!(
            hash,
            format!("{:x}", sha2::Sha256::digest(&files[name])),
            "{name}"
        );
    }
    let label = src
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(files[&format!("{label}/docs/a.txt")], b"alpha");

    // Retention keeps the newest two.
    for _ in 0..2 {
        mesh.run_ok("file.backup_user_data", json!({})).await;
    }
    let archives: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
        .collect();
    assert_eq!(archives.len(), 2);
    assert!(!archive.exists(), "the oldest archive was rotated out");

    mesh.expect_bad_args("file.backup_user_data", json!({"keep": 0}), "keep")
        .await;
    mesh.expect_bad_args(
        "file.backup_user_data",
        json!({"sources": ["rel"], "dest_dir": dest}),
        "sources[0]",
    )
    .await;
}

#[tokio::test]
async fn sync_cloud_storage_uploads_by_digest_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("photos")).unwrap();
    std::fs::write(dir.path().join("photos/a.jpg"), vec![1u8; 300_000]).unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"v1").unwrap();
    let mut s = Settings::empty();
    s.sync_dir = Some(dir.path().to_path_buf());
    s.sync_bucket = "TEST_FILES".into();
    let mesh = Mesh::start(s).await;

    let r = mesh.run_ok("file.sync_cloud_storage", json!({})).await;
    assert_eq!(
        (r["uploaded"].as_u64(), r["unchanged"].as_u64()),
        (Some(2), Some(0)),
        "{r}"
    );
    assert_eq!(r["bytes_uploaded"], 300_002);
    let os = mesh.conn().js.get_object_store("TEST_FILES").await.unwrap();
    let mut obj = os.get("photos/a.jpg").await.unwrap();
    let mut content = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut content)
        .await
        .unwrap();
    assert_eq!(content, vec![1u8; 300_000]);

    // Resumable / by digest: a second run uploads nothing; a change uploads one file.
    let r = mesh.run_ok("file.sync_cloud_storage", json!({})).await;
    assert_eq!(
        (r["uploaded"].as_u64(), r["unchanged"].as_u64()),
        (Some(0), Some(2)),
        "{r}"
    );
    std::fs::write(dir.path().join("notes.txt"), b"v2").unwrap();
    std::fs::remove_file(dir.path().join("photos/a.jpg")).unwrap();
    let r = mesh
        .run_ok("file.sync_cloud_storage", json!({"delete": true}))
        .await;
    assert_eq!(
        (r["uploaded"].as_u64(), r["deleted"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let names: Vec<String> = os
        .list()
        .await
        .unwrap()
        .filter_map(|i| async move { i.ok().filter(|i| !i.deleted).map(|i| i.name) })
        .collect()
        .await;
    assert_eq!(names, vec!["notes.txt".to_string()]);

    // Retry path: the directory appears later.
    let later = dir.path().join("later");
    let id = mesh
        .enqueue(
            "file.sync_cloud_storage",
            json!({"dir": later, "bucket": "TEST_LATER"}),
        )
        .await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    std::fs::create_dir(&later).unwrap();
    std::fs::write(later.join("x"), b"x").unwrap();
    let done = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(done.result.unwrap()["uploaded"], 1);

    mesh.expect_bad_args(
        "file.sync_cloud_storage",
        json!({"bucket": "bad name!"}),
        "bucket",
    )
    .await;
}
