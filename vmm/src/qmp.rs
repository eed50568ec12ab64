//! The QEMU Machine Protocol, as far as test drivers and VM tools use it (`--qmp PATH`): JSON
//! lines over a UNIX socket. A client gets the greeting, negotiates with `qmp_capabilities`,
//! and then sends `{"execute": NAME, "arguments": {...}, "id": ...}`; nixvm answers each with
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}` (with the request's `id`),
//! and sends events (`{"event": NAME, "data": ..., "timestamp": ...}`) as the VM changes.
//!
//! | command | what nixvm does |
//! |---|---|
//! | `qmp_capabilities` | leaves negotiation mode (no capability is offered) |
//! | `query-status` | `{"status": "running"\|"paused", "running": bool, "singlestep": false}` |
//! | `stop`, `cont` | pauses and resumes the vCPUs (events STOP, RESUME) |
//! | `system_powerdown` | presses the ACPI power button (event POWERDOWN) |
//! | `system_reset` | resets the machine: nixvm exits 3, or boots again in place with `--on-reboot restart` (event RESET) |
//! | `quit` | stops the VM at once; nixvm exits 0 (event SHUTDOWN) |
//!
//! When the guest powers off or resets, clients get SHUTDOWN or RESET with `"guest": true`.
use serde_json::{Value, json};

/// A command nixvm knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Capabilities,
    QueryStatus,
    Stop,
    Cont,
    Powerdown,
    Reset,
    Quit,
}

impl Command {
    fn named(name: &str) -> Option<Command> {
        Some(match name {
            "qmp_capabilities" => Command::Capabilities,
            "query-status" => Command::QueryStatus,
            "stop" => Command::Stop,
            "cont" => Command::Cont,
            "system_powerdown" => Command::Powerdown,
            "system_reset" => Command::Reset,
            "quit" => Command::Quit,
            _ => return None,
        })
    }
}

/// A request line, read: the command (or the answer for a request nixvm cannot run), and the
/// request's `id` to echo.
pub struct Request {
    pub id: Option<Value>,
    pub command: Result<Command, String>,
}

/// Reads one request line. What nixvm cannot run comes back as the error line to send.
pub fn parse(line: &str) -> Request {
    let Ok(Value::Object(mut req)) = serde_json::from_str::<Value>(line.trim()) else {
        return Request {
            id: None,
            command: Err(error(
                None,
                "GenericError",
                "JSON parse error: expected an object",
            )),
        };
    };
    let id = req.remove("id");
    let command = match req.get("execute").and_then(Value::as_str) {
        None => Err(error(
            id.as_ref(),
            "GenericError",
            "QMP input lacks member 'execute'",
        )),
        Some(name) => Command::named(name).ok_or_else(|| {
            error(
                id.as_ref(),
                "CommandNotFound",
                &format!("The command {name} has not been found"),
            )
        }),
    };
    Request { id, command }
}

/// What a client reads first.
pub fn greeting() -> String {
    json!({"QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                    "package": concat!("nixvm ", env!("CARGO_PKG_VERSION"))},
        "capabilities": []
    }})
    .to_string()
}

/// A command's answer.
pub fn ok(id: Option<&Value>, ret: Value) -> String {
    with_id(json!({ "return": ret }), id)
}

/// A command's error.
pub fn error(id: Option<&Value>, class: &str, desc: &str) -> String {
    with_id(json!({"error": {"class": class, "desc": desc}}), id)
}

fn with_id(mut v: Value, id: Option<&Value>) -> String {
    if let (Some(id), Value::Object(o)) = (id, &mut v) {
        o.insert("id".into(), id.clone());
    }
    v.to_string()
}

/// An event line, stamped with the time now.
pub fn event(name: &str, data: Option<Value>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut v = json!({
        "event": name,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    });
    if let (Some(d), Value::Object(o)) = (data, &mut v) {
        o.insert("data".into(), d);
    }
    v.to_string()
}

/// The `query-status` answer.
pub fn status(running: bool) -> Value {
    json!({
        "status": if running { "running" } else { "paused" },
        "running": running,
        "singlestep": false,
    })
}

/// The answer while a client has not negotiated yet.
pub fn not_negotiated(id: Option<&Value>) -> String {
    error(
        id,
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn requests_parse_with_their_ids() {
        let r = parse(r#"{"execute": "query-status", "id": 7}"#);
        assert_eq!(r.command, Ok(Command::QueryStatus));
        assert_eq!(r.id, Some(json!(7)));
        let r = parse(r#"{"execute":"qmp_capabilities","arguments":{}}"#);
        assert_eq!((r.command, r.id), (Ok(Command::Capabilities), None));
        let r = parse(r#"{"execute": "screendump", "id": "a"}"#);
        let e = v(&r.command.unwrap_err());
        assert_eq!(e["error"]["class"], "CommandNotFound");
        assert_eq!(e["id"], "a");
        for bad in ["", "[]", "{", r#"{"id": 1}"#, r#"{"execute": 5}"#] {
            let e = v(&parse(bad).command.unwrap_err());
            assert_eq!(e["error"]["class"], "GenericError", "{bad:?}");
        }
    }

    #[test]
    fn lines_are_what_qemu_clients_expect() {
        let g = v(&greeting());
        assert!(g["QMP"]["capabilities"].is_array());
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
        assert_eq!(v(&ok(None, json!({}))), json!({"return": {}}));
        assert_eq!(
            v(&ok(Some(&json!("x")), status(false))),
            json!({"return": {"status": "paused", "running": false, "singlestep": false}, "id": "x"})
        );
        let e = v(&event("SHUTDOWN", Some(json!({"guest": true}))));
        assert_eq!(e["event"], "SHUTDOWN");
        assert_eq!(e["data"]["guest"], true);
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(v(&event("STOP", None)).get("data").is_none());
        assert_eq!(
            v(&not_negotiated(None))["error"]["class"],
            "CommandNotFound"
        );
    }
}
