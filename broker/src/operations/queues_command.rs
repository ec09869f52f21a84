//! `roost queues`: the queues of a running roost, through its admin API, the way
//! `kafka-consumer-groups` shows Kafka's: `list`, `show NAME`, `reset NAME GROUP --to ..`,
//! `purge NAME` and `redrive NAME`. Tables for a person, `--json` (the admin API's own
//! answer, unchanged) for scripts.
//!
//! The command is a thin client: every rule (what a reset means, what redrive moves)
//! lives behind the admin API, so this file only builds requests and lays out answers.
//! It speaks plain HTTP/1.1 over a `TcpStream` (one request per connection, as the admin
//! listener serves them), so it needs no HTTP library.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

/// `roost queues`: flags shared by every action.
#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    /// The admin API's address (`admin_bind` of the broker) [default: $ROOST_ADMIN, else
    /// 127.0.0.1:8081].
    #[arg(long, value_name = "HOST:PORT")]
    pub admin: Option<String>,
    /// Bearer token (`admin_token` of the broker) [default: $ROOST_ADMIN_TOKEN]; none on
    /// a loopback listener without one.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Print the admin API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: QueuesAction,
}

/// The actions of `roost queues`.
#[derive(Debug, clap::Subcommand)]
pub enum QueuesAction {
    /// Every queue: depth, bytes, dead letters, groups and their total lag.
    List,
    /// One queue (`NAME$dlq` for its dead-letter queue): its groups with members, lag,
    /// in flight, waiting out a backoff and delayed; and its settings.
    Show {
        /// The queue.
        name: String,
    },
    /// Move a consumer group (created if new): what follows is delivered again.
    Reset {
        /// The queue.
        name: String,
        /// The group.
        group: String,
        /// `earliest`, `latest`, or an offset (every partition, or `--partition`'s).
        #[arg(
            long,
            conflicts_with = "timestamp_ms",
            required_unless_present = "timestamp_ms"
        )]
        to: Option<String>,
        /// The first message stored at or after this Unix time in ms.
        #[arg(long, value_name = "MS")]
        timestamp_ms: Option<u64>,
        /// Only this partition (with an offset).
        #[arg(long, value_name = "P")]
        partition: Option<u32>,
        /// The group's subtopic filter, if it has one.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Delete every message now in the queue (not its dead letters).
    Purge {
        /// The queue.
        name: String,
    },
    /// Move dead letters back into the queue: all, the oldest `--count`, or `--id`s.
    Redrive {
        /// The queue.
        name: String,
        /// Only the oldest N.
        #[arg(long, conflicts_with = "id")]
        count: Option<u64>,
        /// Only these dead letters (their `message-id`, as the dead-letter queue delivers
        /// them); repeat the flag for several.
        #[arg(long)]
        id: Vec<String>,
    },
}

/// Why a `roost queues` action failed.
#[derive(Debug, thiserror::Error)]
pub enum QueuesCommandError {
    /// The admin API could not be reached or did not answer in HTTP.
    #[error("admin API at {addr}: {why}")]
    Connection {
        /// The address tried.
        addr: String,
        /// What went wrong.
        why: String,
    },
    /// The admin API answered with an error status.
    #[error("admin API: {status} {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its `error` text, or the body.
        message: String,
    },
    /// Bad arguments the parser cannot see (an offset that is not a number).
    #[error("{0}")]
    Usage(String),
}

/// Runs `roost queues`; prints the answer on stdout, errors on stderr.
pub fn run(args: QueuesArgs) -> ExitCode {
    match execute(&args) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roost queues: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: &QueuesArgs) -> Result<String, QueuesCommandError> {
    let admin = AdminClient {
        addr: args
            .admin
            .clone()
            .or_else(|| std::env::var("ROOST_ADMIN").ok())
            .unwrap_or_else(|| "127.0.0.1:8081".into()),
        token: args
            .token
            .clone()
            .or_else(|| std::env::var("ROOST_ADMIN_TOKEN").ok()),
    };
    let (value, render): (Value, fn(&Value) -> String) = match &args.action {
        QueuesAction::List => (admin.call("GET", "/api/v1/queues", None)?, render_list),
        QueuesAction::Show { name } => (
            admin.call("GET", &format!("/api/v1/queues/{}", segment(name)), None)?,
            render_show,
        ),
        QueuesAction::Reset {
            name,
            group,
            to,
            timestamp_ms,
            partition,
            filter,
        } => {
            let mut body = reset_body(to.as_deref(), *timestamp_ms, *partition)?;
            if let Some(f) = filter {
                body["filter"] = json!(f);
            }
            let path = format!(
                "/api/v1/queues/{}/groups/{}/reset",
                segment(name),
                segment(group)
            );
            (admin.call("POST", &path, Some(&body))?, render_object)
        }
        QueuesAction::Purge { name } => (
            admin.call(
                "POST",
                &format!("/api/v1/queues/{}/purge", segment(name)),
                None,
            )?,
            render_object,
        ),
        QueuesAction::Redrive { name, count, id } => {
            let body = match (count, id.is_empty()) {
                (Some(n), _) => json!({ "count": n }),
                (None, false) => json!({ "message_ids": id }),
                (None, true) => json!({}),
            };
            let path = format!("/api/v1/queues/{}/dlq/redrive", segment(name));
            (admin.call("POST", &path, Some(&body))?, render_redrive)
        }
    };
    Ok(if args.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )
    } else {
        render(&value)
    })
}

/// The body of a group reset, as the admin API takes it.
fn reset_body(
    to: Option<&str>,
    timestamp_ms: Option<u64>,
    partition: Option<u32>,
) -> Result<Value, QueuesCommandError> {
    let mut body = match (to, timestamp_ms) {
        (_, Some(t)) => json!({ "timestamp_ms": t }),
        (Some(w @ ("earliest" | "latest")), None) => json!({ "to": w }),
        (Some(offset), None) => match offset.parse::<u64>() {
            Ok(o) => json!({ "offset": o }),
            Err(_) => {
                return Err(QueuesCommandError::Usage(format!(
                    "--to {offset:?}: earliest, latest or an offset"
                )));
            }
        },
        (None, None) => {
            return Err(QueuesCommandError::Usage(
                "reset needs --to or --timestamp-ms".into(),
            ));
        }
    };
    if let Some(p) = partition {
        if body.get("offset").is_none() {
            return Err(QueuesCommandError::Usage(
                "--partition goes with --to OFFSET".into(),
            ));
        }
        body["partition"] = json!(p);
    }
    Ok(body)
}

/// Percent-encodes a path segment (queue and group names may hold `/`, `$`, spaces).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One admin API, one request per connection.
struct AdminClient {
    addr: String,
    token: Option<String>,
}

impl AdminClient {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, QueuesCommandError> {
        let fail = |why: String| QueuesCommandError::Connection {
            addr: self.addr.clone(),
            why,
        };
        let addr = self
            .addr
            .to_socket_addrs()
            .map_err(|e| fail(e.to_string()))?
            .next()
            .ok_or_else(|| fail("no address".into()))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| fail(e.to_string()))?;
        // Purge and redrive of big queues take a while; the listener answers in one go.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(t) = &self.token {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        stream
            .write_all(request.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .map_err(|e| fail(e.to_string()))?;
        let (status, body) =
            parse_response(&answer).ok_or_else(|| fail("not an HTTP answer".into()))?;
        let value: Value =
            serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)));
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_owned);
            Err(QueuesCommandError::Refused { status, message })
        }
    }
}

/// The status and body of an HTTP/1.1 answer (the admin listener sends a Content-Length
/// and closes; the body is what follows the head).
fn parse_response(answer: &[u8]) -> Option<(u16, &[u8])> {
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..head_end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, &answer[head_end + 4..]))
}

/// Lays out rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn groups(v: &Value) -> &[Value] {
    v.get("groups")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn render_list(v: &Value) -> String {
    let queues = v.as_array().map_or(&[][..], Vec::as_slice);
    if queues.is_empty() {
        return "no queues\n".into();
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            let gs = groups(q);
            let lag: u64 = gs.iter().map(|g| num(g, "lag")).sum();
            let partitions = q.get("config").map_or(0, |c| num(c, "partitions"));
            vec![
                text(q, "name"),
                partitions.to_string(),
                num(q, "depth").to_string(),
                num(q, "bytes").to_string(),
                num(q, "dead_letters").to_string(),
                gs.len().to_string(),
                lag.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "QUEUE",
            "PARTITIONS",
            "DEPTH",
            "BYTES",
            "DEAD-LETTERS",
            "GROUPS",
            "LAG",
        ],
        &rows,
    )
}

fn render_show(q: &Value) -> String {
    let mut out = format!(
        "queue {}: depth {}, {} bytes, {} dead letters\n\n",
        text(q, "name"),
        num(q, "depth"),
        num(q, "bytes"),
        num(q, "dead_letters")
    );
    let rows: Vec<Vec<String>> = groups(q)
        .iter()
        .map(|g| {
            let members = g
                .get("members")
                .and_then(Value::as_array)
                .map(|m| {
                    m.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "-".into());
            vec![
                text(g, "group"),
                text(g, "filter"),
                num(g, "lag").to_string(),
                num(g, "in_flight").to_string(),
                num(g, "waiting").to_string(),
                num(g, "delayed").to_string(),
                members,
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no consumer groups\n");
    } else {
        out.push_str(&table(
            &[
                "GROUP",
                "FILTER",
                "LAG",
                "IN-FLIGHT",
                "WAITING",
                "DELAYED",
                "MEMBERS",
            ],
            &rows,
        ));
    }
    if let Some(Value::Object(config)) = q.get("config") {
        out.push_str("\nsettings:\n");
        for (k, v) in config {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    out
}

fn render_redrive(r: &Value) -> String {
    let missing = r
        .get("missing")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut out = format!("redriven {}", num(r, "redriven"));
    if missing > 0 {
        out.push_str(&format!(", {missing} not dead letters"));
    }
    if let Some(why) = r.get("stopped").and_then(Value::as_str) {
        out.push_str(&format!(" (stopped: {why})"));
    }
    out.push('\n');
    out
}

/// Any other answer: a queue (a reset answers with the queue) as `show` lays it out,
/// anything else as its keys, one per line.
fn render_object(v: &Value) -> String {
    if v.get("groups").is_some() && v.get("name").is_some() {
        return render_show(v);
    }
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| format!("{k}: {v}\n")).collect(),
        other => format!("{other}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> Value {
        json!({
            "name": "orders", "depth": 5, "bytes": 1260, "dead_letters": 2,
            "groups": [
                {"group": "billing", "filter": null, "members": ["w-1", "w-2"], "lag": 5,
                 "in_flight": 2, "waiting": 0, "delayed": 1},
                {"group": "audit", "filter": "eu/#", "members": [], "lag": 7,
                 "in_flight": 0, "waiting": 0, "delayed": 0}
            ],
            "config": {"partitions": 4, "consumer_window": 256}
        })
    }

    #[test]
    fn list_sums_the_lag_of_every_group() {
        let out = render_list(&json!([orders()]));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "QUEUE",
                "PARTITIONS",
                "DEPTH",
                "BYTES",
                "DEAD-LETTERS",
                "GROUPS",
                "LAG"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["orders", "4", "5", "1260", "2", "2", "12"]
        );
        assert_eq!(render_list(&json!([])), "no queues\n");
    }

    #[test]
    fn show_has_a_row_per_group_with_members_and_the_settings() {
        let out = render_show(&orders());
        assert!(out.starts_with("queue orders: depth 5, 1260 bytes, 2 dead letters\n"));
        let rows: Vec<Vec<&str>> = out
            .lines()
            .skip_while(|l| !l.starts_with("GROUP"))
            .take(3)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[1], ["billing", "-", "5", "2", "0", "1", "w-1,w-2"]);
        assert_eq!(rows[2], ["audit", "eu/#", "7", "0", "0", "0", "-"]);
        assert!(out.contains("  consumer_window = 256\n"));
    }

    #[test]
    fn reset_bodies_follow_the_admin_api() {
        assert_eq!(
            reset_body(Some("earliest"), None, None).ok(),
            Some(json!({"to": "earliest"}))
        );
        assert_eq!(
            reset_body(Some("42"), None, Some(3)).ok(),
            Some(json!({"offset": 42, "partition": 3}))
        );
        assert_eq!(
            reset_body(None, Some(1_767_225_600_000), None).ok(),
            Some(json!({"timestamp_ms": 1_767_225_600_000u64}))
        );
        assert!(reset_body(Some("soon"), None, None).is_err());
        assert!(reset_body(Some("latest"), None, Some(1)).is_err());
    }

    #[test]
    fn names_are_percent_encoded_and_answers_parsed() {
        assert_eq!(segment("orders$dlq"), "orders%24dlq");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        let answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(answer), Some((404, &b"{}"[..])));
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(
            render_redrive(&json!({"redriven": 3, "missing": ["x"], "stopped": null})),
            "redriven 3, 1 not dead letters\n"
        );
    }
}
