//! A small RFC 5545 reader: enough of iCalendar to synchronize events (`VEVENT`
//! components and their common properties). Lines are unfolded, text values unescaped,
//! nested components (`VALARM`) skipped. Recurrence rules are kept as text, not expanded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One event (a `VEVENT`), or one overridden instance of a recurring event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `UID`.
    pub uid: String,
    /// `RECURRENCE-ID` of an overridden instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence_id: Option<String>,
    /// `SUMMARY`.
    #[serde(default)]
    pub summary: String,
    /// `DESCRIPTION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `LOCATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// `DTSTART` as written (`20261129T080000Z`, `20261129T080000`, `20261129`).
    #[serde(default)]
    pub start: String,
    /// `DTEND` as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// The `TZID` parameter of `DTSTART`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tzid: Option<String>,
    /// A date without a time (`VALUE=DATE`).
    #[serde(default)]
    pub all_day: bool,
    /// `STATUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `RRULE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rrule: Option<String>,
    /// `SEQUENCE` (revision number).
    #[serde(default)]
    pub sequence: i64,
    /// `LAST-MODIFIED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

impl Event {
    /// The identity of an event in a feed: `UID`, plus `RECURRENCE-ID` for an override.
    pub fn identity(&self) -> String {
        match &self.recurrence_id {
            Some(r) => format!("{}#{r}", self.uid),
            None => self.uid.clone(),
        }
    }

    /// Is `self` a newer revision than `other` (higher `SEQUENCE`, then later
    /// `LAST-MODIFIED`)?
    pub fn newer_than(&self, other: &Event) -> bool {
        (self.sequence, self.last_modified.as_deref())
            > (other.sequence, other.last_modified.as_deref())
    }
}

/// Why a calendar could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IcsError {
    /// No `BEGIN:VCALENDAR`.
    #[error("not an iCalendar document (no BEGIN:VCALENDAR)")]
    NotCalendar,
    /// A `VEVENT` without `UID`.
    #[error("event {0} has no UID")]
    MissingUid(usize),
}

/// Parsed feed: events by identity (duplicates resolved) and how many duplicates were
/// dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calendar {
    /// Events by [`Event::identity`].
    pub events: BTreeMap<String, Event>,
    /// Older revisions of the same identity that were dropped.
    pub duplicates: usize,
}

fn unfold(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for raw in text.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(cont) = raw.strip_prefix([' ', '\t'])
            && let Some(last) = lines.last_mut()
        {
            last.push_str(cont);
            continue;
        }
        if !raw.is_empty() {
            lines.push(raw.to_owned());
        }
    }
    lines
}

/// A content line's parameters (`TZID=…`), names upper-cased.
type Params = Vec<(String, String)>;

/// Splits a content line into (upper-case name, parameters, value).
fn split_line(line: &str) -> Option<(String, Params, String)> {
    let mut in_quotes = false;
    let mut colon = None;
    for (i, ch) in line.char_indices() {
        match ch {
            '"' => in_quotes = !in_quotes,
            ':' if !in_quotes => {
                colon = Some(i);
                break;
            }
            _ => {}
        }
    }
    let colon = colon?;
    let (head, value) = (&line[..colon], &line[colon + 1..]);
    let mut parts = head.split(';');
    let name = parts.next()?.trim().to_ascii_uppercase();
    let params = parts
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((
                k.trim().to_ascii_uppercase(),
                v.trim_matches('"').to_owned(),
            ))
        })
        .collect();
    Some((name, params, value.to_owned()))
}

/// Unescapes a TEXT value (`\n`, `\,`, `\;`, `\\`).
pub fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n' | 'N') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses a calendar's events.
pub fn parse(text: &str) -> Result<Calendar, IcsError> {
    let lines = unfold(text);
    if !lines
        .iter()
        .any(|l| l.eq_ignore_ascii_case("BEGIN:VCALENDAR"))
    {
        return Err(IcsError::NotCalendar);
    }
    let mut cal = Calendar::default();
    let mut current: Option<Event> = None;
    let mut depth = 0usize; // nesting inside the current VEVENT
    let mut n = 0usize;
    for line in &lines {
        let Some((name, params, value)) = split_line(line) else {
            continue;
        };
        let upper = value.to_ascii_uppercase();
        match (name.as_str(), current.is_some()) {
            ("BEGIN", false) if upper == "VEVENT" => {
                current = Some(Event::default());
                depth = 0;
            }
            ("BEGIN", true) => depth += 1,
            ("END", true) if depth > 0 => depth -= 1,
            ("END", true) if upper == "VEVENT" => {
                n += 1;
                let Some(ev) = current.take() else { continue };
                if ev.uid.is_empty() {
                    return Err(IcsError::MissingUid(n));
                }
                let id = ev.identity();
                match cal.events.get(&id) {
                    Some(old) if !ev.newer_than(old) => cal.duplicates += 1,
                    Some(_) => {
                        cal.duplicates += 1;
                        cal.events.insert(id, ev);
                    }
                    None => {
                        cal.events.insert(id, ev);
                    }
                }
            }
            (_, true) if depth == 0 => {
                let Some(ev) = current.as_mut() else { continue };
                let param = |k: &str| {
                    params
                        .iter()
                        .find(|(pk, _)| pk == k)
                        .map(|(_, v)| v.clone())
                };
                match name.as_str() {
                    "UID" => ev.uid = value.trim().to_owned(),
                    "SUMMARY" => ev.summary = unescape(&value),
                    "DESCRIPTION" => ev.description = Some(unescape(&value)),
                    "LOCATION" => ev.location = Some(unescape(&value)),
                    "DTSTART" => {
                        ev.all_day = param("VALUE").is_some_and(|v| v.eq_ignore_ascii_case("DATE"))
                            || value.len() == 8;
                        ev.tzid = param("TZID");
                        ev.start = value.trim().to_owned();
                    }
                    "DTEND" => ev.end = Some(value.trim().to_owned()),
                    "STATUS" => ev.status = Some(upper.trim().to_owned()),
                    "RRULE" => ev.rrule = Some(value.trim().to_owned()),
                    "SEQUENCE" => ev.sequence = value.trim().parse().unwrap_or(0),
                    "LAST-MODIFIED" => ev.last_modified = Some(value.trim().to_owned()),
                    "RECURRENCE-ID" => ev.recurrence_id = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(cal)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_folded_escaped_and_duplicate_events() {
        let text = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:a@x\r\nSUMMARY:Team\r\n  meeting\\, weekly\r\nDTSTART;TZID=Europe/Berlin:20261129T100000\r\nBEGIN:VALARM\r\nSUMMARY:alarm\r\nEND:VALARM\r\nSEQUENCE:1\r\nEND:VEVENT\r\nBEGIN:VEVENT\r\nUID:a@x\r\nSUMMARY:old\r\nSEQUENCE:0\r\nDTSTART;VALUE=DATE:20261129\r\nEND:VEVENT\r\nBEGIN:VEVENT\r\nUID:b@x\r\nDTSTART:20261130\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
        let cal = parse(text).unwrap();
        assert_eq!(cal.events.len(), 2);
        assert_eq!(cal.duplicates, 1);
        let a = &cal.events["a@x"];
        assert_eq!(a.summary, "Team meeting, weekly");
        assert_eq!(a.tzid.as_deref(), Some("Europe/Berlin"));
        assert!(!a.all_day);
        assert!(cal.events["b@x"].all_day);
        assert_eq!(parse("hello"), Err(IcsError::NotCalendar));
        assert!(matches!(
            parse("BEGIN:VCALENDAR\nBEGIN:VEVENT\nSUMMARY:x\nEND:VEVENT\nEND:VCALENDAR"),
            Err(IcsError::MissingUid(1))
        ));
    }
}
