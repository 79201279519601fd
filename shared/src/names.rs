//! Validated names: categories, task names, task ids and priority lanes.
//!
//! Every name that ends up in a NATS subject or a KV key is validated here, once, at the
//! boundary (config load, enqueue, delivery decode). Past this module a [`Category`] or a
//! [`TaskName`] is known to be a valid subject token.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// A subject token was empty or had a character outside `[a-z0-9_-]`.
    #[error("invalid {what} {value:?}: use only lower-case letters, digits, '_' and '-'")]
    Token {
        /// What kind of name it was (`category`, `task name`).
        what: &'static str,
        /// The refused value.
        value: String,
    },
    /// A task name without the `<category>.<name>` shape.
    #[error("invalid task name {0:?}: expected <category>.<name>, for example email.send")]
    TaskShape(String),
    /// A task id outside `[A-Za-z0-9_=-]{{1,128}}`.
    #[error("invalid task id {0:?}: use 1 to 128 characters from A-Z, a-z, 0-9, '_', '=' and '-'")]
    TaskId(String),
    /// An unknown priority lane.
    #[error("invalid priority {0:?}: expected high, normal or low")]
    Lane(String),
}

/// Is `s` a valid subject token (`[a-z0-9_-]+`)?
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn token(what: &'static str, s: &str) -> Result<(), NameError> {
    if is_token(s) {
        Ok(())
    } else {
        Err(NameError::Token {
            what,
            value: s.to_owned(),
        })
    }
}

macro_rules! string_newtype_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

/// A task category (`ai`, `email`, …): one stream, one worker pool. Matches `[a-z0-9_-]+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Category(String);

impl Category {
    /// Validates and wraps a category name.
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        token("category", &s)?;
        Ok(Self(s))
    }
    /// The category as written (`email`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Category {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}
string_newtype_serde!(Category);

/// A task's full name, `<category>.<name>` (`email.send`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskName {
    full: String,
    dot: usize,
}

impl TaskName {
    /// Validates `<category>.<name>`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (cat, name) = s
            .split_once('.')
            .ok_or_else(|| NameError::TaskShape(s.to_owned()))?;
        token("category", cat)?;
        token("task name", name)?;
        Ok(Self {
            full: s.to_owned(),
            dot: cat.len(),
        })
    }
    /// Builds a name from a category and a short name.
    pub fn new(category: &Category, name: &str) -> Result<Self, NameError> {
        token("task name", name)?;
        Ok(Self {
            full: format!("{}.{}", category.as_str(), name),
            dot: category.as_str().len(),
        })
    }
    /// The full name (`email.send`).
    pub fn as_str(&self) -> &str {
        &self.full
    }
    /// The category part (`email`).
    pub fn category_str(&self) -> &str {
        &self.full[..self.dot]
    }
    /// The category part as a [`Category`].
    pub fn category(&self) -> Category {
        Category(self.category_str().to_owned())
    }
    /// The short name (`send`).
    pub fn short(&self) -> &str {
        &self.full[self.dot + 1..]
    }
}

impl FromStr for TaskName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
string_newtype_serde!(TaskName);

/// Is `s` a valid task id (`[A-Za-z0-9_=-]{1,128}`, usable as a KV key)?
pub fn is_task_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'=' || b == b'-')
}

/// A task id: the idempotency key, the `Nats-Msg-Id`, the result key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(String);

impl TaskId {
    /// Validates an id.
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if is_task_id(&s) {
            Ok(Self(s))
        } else {
            Err(NameError::TaskId(s))
        }
    }
    /// A fresh UUIDv7 id (time-ordered to the millisecond).
    ///
    /// The 74 random bits come from a per-thread generator seeded once from the OS, not a
    /// `getrandom` system call per id (which was the largest single cost of `send`).
    pub fn generate() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let random = fastrand::u128(..).to_le_bytes();
        let mut ten = [0u8; 10];
        ten.copy_from_slice(&random[..10]);
        let id = uuid::Builder::from_unix_timestamp_millis(ms, &ten).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        Self(id.hyphenated().encode_lower(&mut buf).to_owned())
    }
    /// The id as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TaskId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}
string_newtype_serde!(TaskId);

/// A priority lane within a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Lane {
    /// Served first (subject suffix `.high`, consumer `<category>-high`).
    High,
    /// The default lane (no subject suffix, consumer `<category>`).
    #[default]
    Normal,
    /// Served last, with a starvation guard (subject suffix `.low`).
    Low,
}

impl Lane {
    /// All lanes, in service order.
    pub const ALL: [Lane; 3] = [Lane::High, Lane::Normal, Lane::Low];

    /// The lane's name (`high`, `normal`, `low`).
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::High => "high",
            Lane::Normal => "normal",
            Lane::Low => "low",
        }
    }
    /// The subject / consumer suffix, `None` for the normal lane.
    pub fn suffix(self) -> Option<&'static str> {
        match self {
            Lane::High => Some("high"),
            Lane::Normal => None,
            Lane::Low => Some("low"),
        }
    }
}

impl FromStr for Lane {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "high" => Ok(Lane::High),
            "normal" | "" => Ok(Lane::Normal),
            "low" => Ok(Lane::Low),
            other => Err(NameError::Lane(other.to_owned())),
        }
    }
}
impl Serialize for Lane {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> Deserialize<'de> for Lane {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn task_names() {
        let ok = ["email.send", "ai.test_scheduler_connection", "a-b.c_d-9"];
        for s in ok {
            let t = TaskName::parse(s).unwrap();
            assert_eq!(t.as_str(), s);
        }
        let t = TaskName::parse("email.send").unwrap();
        assert_eq!((t.category_str(), t.short()), ("email", "send"));
        let bad = [
            "",
            "email",
            ".send",
            "email.",
            "Email.send",
            "email.send.x",
            "email.se nd",
            "email.*",
            "email.>",
        ];
        for s in bad {
            assert!(TaskName::parse(s).is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn task_ids() {
        assert!(is_task_id("0192f6c8-7a1b-7c3d-9e0f-123456789abc"));
        assert!(is_task_id("abc_DEF=-1"));
        assert!(is_task_id(&"a".repeat(128)));
        for bad in ["", "a.b", "a b", "a/b", "a*", "a>", "é", &"a".repeat(129)] {
            assert!(!is_task_id(bad), "{bad:?}");
        }
        assert!(is_task_id(TaskId::generate().as_str()));
    }

    #[test]
    fn generated_ids_are_uuid_v7_unique_and_ordered_by_millisecond() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids: Vec<TaskId> = (0..10_000).map(|_| TaskId::generate()).collect();
        let set: std::collections::HashSet<&str> = ids.iter().map(TaskId::as_str).collect();
        assert_eq!(set.len(), ids.len(), "duplicate generated ids");
        let mut last = 0;
        for id in &ids {
            let u = uuid::Uuid::parse_str(id.as_str()).unwrap();
            assert_eq!(u.get_version_num(), 7, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
            let (secs, nanos) = u.get_timestamp().unwrap().to_unix();
            let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(ms >= before && ms >= last, "{id}: not time-ordered");
            last = ms;
        }
    }

    #[test]
    fn lanes_round_trip() {
        for lane in Lane::ALL {
            assert_eq!(lane.as_str().parse::<Lane>().unwrap(), lane);
        }
        assert!("urgent".parse::<Lane>().is_err());
    }

    #[test]
    fn serde_validates() {
        let c: Result<Category, _> = serde_json::from_str("\"Bad Cat\"");
        assert!(c.is_err());
        let t: TaskName = serde_json::from_str("\"email.send\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"email.send\"");
    }
}
