//! Topology as code: the streams, consumers and buckets of DESIGN.md, built from config.
//!
//! [`provision`] creates or updates everything idempotently; the `*_config` functions are
//! pure so tests can check the exact settings. Workers never call `provision`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use taskmesh_shared::config::{CategoryConfig, Config};
use taskmesh_shared::{Category, Lane, wire};

use crate::error::NatsError;

/// Stream config of a category: WorkQueue, file storage, lanes and delayed subjects,
/// duplicate window, size limit, message schedules allowed.
pub fn task_stream_config(category: &Category, cfg: &Config) -> stream::Config {
    stream::Config {
        name: wire::stream_name(category),
        description: Some(format!("taskmesh tasks of category {category}")),
        subjects: wire::stream_subjects(category),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: cfg.streams.replicas,
        duplicate_window: cfg.streams.duplicate_window,
        max_message_size: cfg.streams.max_msg_size,
        max_bytes: cfg.streams.max_bytes,
        // Message schedules require discard-old; with no byte limit nothing is discarded.
        discard: stream::DiscardPolicy::Old,
        allow_message_schedules: true,
        allow_message_ttl: true,
        ..Default::default()
    }
}

/// Consumer config of one lane of a category: durable pull, explicit ack. No
/// `inactive_threshold` (KEDA may scale workers to zero) and no `backoff` list (it would
/// override `ack_wait`; retry delays are sent with each Nak instead).
pub fn lane_consumer_config(
    category: &Category,
    lane: Lane,
    cat: &CategoryConfig,
) -> consumer::pull::Config {
    let name = wire::consumer_name(category, lane);
    consumer::pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(format!(
            "taskmesh workers of {category} ({} lane)",
            lane.as_str()
        )),
        filter_subject: wire::lane_filter(category, lane),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: cat.ack_wait,
        max_deliver: cat.max_deliver,
        max_ack_pending: cat.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        max_waiting: 512,
        ..Default::default()
    }
}

/// The dead-letter stream: Limits retention, kept `dlq.max_age`.
pub fn dlq_stream_config(cfg: &Config) -> stream::Config {
    stream::Config {
        name: wire::DLQ_STREAM.into(),
        description: Some("taskmesh dead letters".into()),
        subjects: vec![wire::dlq_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: cfg.streams.replicas,
        max_age: cfg.dlq.max_age,
        duplicate_window: Duration::from_secs(120),
        // A dead letter carries the original body plus headers.
        max_message_size: cfg.streams.max_msg_size.saturating_add(16 * 1024),
        ..Default::default()
    }
}

/// Every KV bucket of DESIGN.md with its retention.
pub fn bucket_configs(cfg: &Config) -> Vec<kv::Config> {
    let base = |bucket: &str, description: &str, history: i64, max_age: Duration| kv::Config {
        bucket: bucket.into(),
        description: description.into(),
        history,
        max_age,
        storage: jetstream::stream::StorageType::File,
        num_replicas: cfg.streams.replicas,
        ..Default::default()
    };
    vec![
        base(
            wire::RESULTS_BUCKET,
            "taskmesh task results",
            1,
            cfg.results.ttl,
        ),
        base(
            wire::SCHEDULES_BUCKET,
            "taskmesh dynamic schedules",
            5,
            Duration::ZERO,
        ),
        base(
            wire::SCHEDULER_BUCKET,
            "taskmesh schedule cursors",
            1,
            Duration::ZERO,
        ),
        base(
            wire::LEASES_BUCKET,
            "taskmesh scheduler leader lease",
            1,
            cfg.scheduler.lease_ttl,
        ),
        base(
            wire::WORKERS_BUCKET,
            "taskmesh worker heartbeats",
            1,
            cfg.worker.heartbeat_interval * 3,
        ),
        base(
            wire::LIMITS_BUCKET,
            "taskmesh shared rate limiters",
            1,
            Duration::ZERO,
        ),
        base(
            wire::CANCELS_BUCKET,
            "taskmesh cancel requests",
            1,
            cfg.results.ttl,
        ),
        base(
            wire::EMAIL_LEDGER_BUCKET,
            "taskmesh catalog: email.send delivery ledger",
            1,
            Duration::from_secs(7 * 24 * 3600),
        ),
        base(
            wire::CALENDAR_BUCKET,
            "taskmesh catalog: calendar events",
            1,
            Duration::ZERO,
        ),
        base(
            wire::NOTION_BUCKET,
            "taskmesh catalog: Notion pages",
            1,
            Duration::ZERO,
        ),
        base(
            wire::CATALOG_STATE_BUCKET,
            "taskmesh catalog: task state",
            1,
            Duration::ZERO,
        ),
        kv::Config {
            // Per-key TTLs (each unique lock expires with its window).
            limit_markers: Some(Duration::from_secs(1)),
            ..base(
                wire::UNIQUE_BUCKET,
                "taskmesh unique-task locks",
                1,
                Duration::ZERO,
            )
        },
    ]
}

/// What [`provision`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    /// Streams created or updated.
    pub streams: Vec<String>,
    /// Consumers created or updated, as `STREAM/consumer`.
    pub consumers: Vec<String>,
    /// KV buckets created or updated.
    pub buckets: Vec<String>,
}

/// Creates or updates every stream, consumer and bucket. Safe to run again and from
/// several places at once.
pub async fn provision(
    js: &jetstream::Context,
    cfg: &Config,
) -> Result<ProvisionReport, NatsError> {
    let mut report = ProvisionReport::default();
    for (category, cat) in cfg.enabled_categories() {
        let sc = task_stream_config(category, cfg);
        let name = sc.name.clone();
        js.create_or_update_stream(sc)
            .await
            .map_err(|e| NatsError::js(format!("creating stream {name}"), e))?;
        report.streams.push(name.clone());
        for lane in Lane::ALL {
            let cc = lane_consumer_config(category, lane, cat);
            let cname = cc.name.clone().unwrap_or_default();
            js.create_consumer_on_stream(cc, &name)
                .await
                .map_err(|e| NatsError::js(format!("creating consumer {cname} on {name}"), e))?;
            report.consumers.push(format!("{name}/{cname}"));
        }
    }
    let dlq = dlq_stream_config(cfg);
    js.create_or_update_stream(dlq)
        .await
        .map_err(|e| NatsError::js(format!("creating stream {}", wire::DLQ_STREAM), e))?;
    report.streams.push(wire::DLQ_STREAM.into());
    for b in bucket_configs(cfg) {
        let name = b.bucket.clone();
        js.create_or_update_key_value(b)
            .await
            .map_err(|e| NatsError::js(format!("creating bucket {name}"), e))?;
        report.buckets.push(name);
    }
    // The Object Store `file.sync_cloud_storage` writes to (workers may not create it).
    if js.get_object_store(wire::FILES_OBJECT_STORE).await.is_err() {
        js.create_object_store(jetstream::object_store::Config {
            bucket: wire::FILES_OBJECT_STORE.into(),
            description: Some("taskmesh catalog: file.sync_cloud_storage".into()),
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.streams.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            NatsError::js(
                format!("creating object store {}", wire::FILES_OBJECT_STORE),
                e,
            )
        })?;
    }
    report.buckets.push(wire::FILES_OBJECT_STORE.into());
    Ok(report)
}

/// Opens a KV bucket, with a "run provision" error when it is missing.
pub async fn bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, NatsError> {
    js.get_key_value(name).await.map_err(|e| {
        if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket {
            NatsError::NotProvisioned {
                what: format!("bucket {name} (or this identity may not read it)"),
            }
        } else {
            NatsError::js(format!("opening bucket {name}"), e)
        }
    })
}

/// Binds a lane's durable consumer.
pub async fn lane_consumer(
    js: &jetstream::Context,
    category: &Category,
    lane: Lane,
) -> Result<consumer::PullConsumer, NatsError> {
    let sname = wire::stream_name(category);
    let cname = wire::consumer_name(category, lane);
    js.get_consumer_from_stream(&cname, &sname)
        .await
        .map_err(|e| {
            if let jetstream::stream::ConsumerErrorKind::JetStream(j) = e.kind()
                && (j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                    || j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
            {
                NatsError::NotProvisioned {
                    what: format!("consumer {cname} on stream {sname}"),
                }
            } else {
                NatsError::js(format!("binding consumer {cname} on {sname}"), e)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_and_consumers_follow_the_contract() {
        let cfg = Config::default();
        let email = "email"
            .parse::<Category>()
            .unwrap_or_else(|_| unreachable!());
        let s = task_stream_config(&email, &cfg);
        assert_eq!(s.name, "TASKS_EMAIL");
        assert_eq!(s.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(s.storage, stream::StorageType::File);
        assert!(s.allow_message_schedules);
        assert_eq!(s.duplicate_window, Duration::from_secs(600));
        let c = lane_consumer_config(&email, Lane::High, &cfg.categories[&email]);
        assert_eq!(c.durable_name.as_deref(), Some("email-high"));
        assert_eq!(c.filter_subject, "tasks.email.*.high");
        assert_eq!(c.inactive_threshold, Duration::ZERO);
        let names: Vec<String> = bucket_configs(&cfg).into_iter().map(|b| b.bucket).collect();
        assert_eq!(
            names,
            [
                "TASKMESH_RESULTS",
                "TASKMESH_SCHEDULES",
                "TASKMESH_SCHEDULER",
                "TASKMESH_LEASES",
                "TASKMESH_WORKERS",
                "TASKMESH_LIMITS",
                "TASKMESH_CANCELS",
                "TASKMESH_EMAIL_LEDGER",
                "TASKMESH_CALENDAR",
                "TASKMESH_NOTION",
                "TASKMESH_CATALOG_STATE",
                "TASKMESH_UNIQUE"
            ]
        );
    }
}
