//! The control socket (`--api-socket`) and its client (`nixvm ctl`).
//!
//! Protocol version 1: JSON lines over a UNIX stream socket (mode 0600). The client sends one
//! request object per line, `{"cmd": "NAME", ...}`; nixvm answers each with one object,
//! `{"ok": true, ...}` or `{"ok": false, "error": "sentence"}`.
//!
//! | request | answer |
//! |---|---|
//! | `{"cmd":"ping"}` | `{"ok":true,"protocol":1,"version":"…"}` |
//! | `{"cmd":"info"}` | `{"ok":true,"info":{"state":…,"vcpus":…,"memory":…,"uptime_s":…,"config":{…}}}` |
//! | `{"cmd":"pause"}` / `{"cmd":"resume"}` | `{"ok":true,"state":"paused"\|"running"}` once the vCPUs are stopped / running |
//! | `{"cmd":"shutdown","timeout":SECS}` | presses the ACPI power button; answers once the VM is gone and nixvm is about to exit: `{"ok":true,"result":"powered-off"}`, or `"forced"` when the guest did not power off within the timeout (default: `--shutdown-timeout`) and nixvm stopped it |
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const PROTOCOL: u32 = 1;

/// A request, as the client sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Ping,
    Info,
    Pause,
    Resume,
    Shutdown {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
}

/// One answer, as nixvm sends it: `ok` and whichever fields the request has.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ping`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `info`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
    /// `pause`, `resume`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// `shutdown`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ShutdownResult>,
}

/// What `info` tells about the VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub state: State,
    pub vcpus: u8,
    pub memory: String,
    pub uptime_s: f64,
    pub pid: u32,
    /// The resolved configuration, as `--dry-run` prints it.
    pub config: serde_json::Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Running,
    Paused,
    ShuttingDown,
}

/// How the VM ended, for the `shutdown` request that waited for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownResult {
    PoweredOff,
    Forced,
    Rebooted,
    Failed,
}

impl Answer {
    /// A successful answer; the caller fills in the request's fields.
    pub fn ok() -> Answer {
        Answer {
            ok: true,
            ..Answer::default()
        }
    }

    /// The answer to a request that failed.
    pub fn error(message: &str) -> Answer {
        Answer {
            ok: false,
            error: Some(message.to_owned()),
            ..Answer::default()
        }
    }

    /// The answer as one line (without its newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("answers serialize")
    }
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("not a valid request: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nothing listens on control socket {path} (is the VM running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nixvm on {path} closed the connection without an answer")]
    NoAnswer { path: PathBuf },
    #[error("nixvm on {path} answered something that is not JSON: {line}")]
    BadAnswer { path: PathBuf, line: String },
    #[error("nixvm refused: {0}")]
    Refused(String),
}

/// `nixvm ctl`'s exit statuses.
pub const CTL_OK: u8 = 0;
/// `shutdown`: the guest did not power off in time and nixvm stopped it hard.
pub const CTL_FORCED: u8 = 1;
pub const CTL_USAGE: u8 = 2;
pub const CTL_REFUSED: u8 = 3;

impl Error {
    pub fn status(&self) -> u8 {
        match self {
            Error::Connect { .. } => CTL_USAGE,
            Error::Refused(_) => CTL_REFUSED,
            _ => crate::lifecycle::EXIT_FAILED,
        }
    }
}

/// Sends `req` to the nixvm on `path` and returns its answer. A `shutdown` answer comes when
/// the VM is gone; the client then waits for nixvm to close the connection (its exit).
pub fn call(path: &Path, req: &Request) -> Result<Answer, Error> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_owned(),
        source,
    })?;
    let wait = match req {
        Request::Shutdown { timeout } => {
            let t = timeout
                .unwrap_or(300)
                .min(crate::lifecycle::MAX_SHUTDOWN_TIMEOUT);
            Duration::from_secs(t + 120)
        }
        _ => Duration::from_secs(60),
    };
    s.set_read_timeout(Some(wait)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    if r.read_line(&mut answer).map_err(io)? == 0 {
        return Err(Error::NoAnswer {
            path: path.to_owned(),
        });
    }
    let v: Answer = serde_json::from_str(answer.trim()).map_err(|_| Error::BadAnswer {
        path: path.to_owned(),
        line: answer.trim().to_owned(),
    })?;
    if !v.ok {
        let why = v.error.unwrap_or_else(|| "no reason given".to_owned());
        return Err(Error::Refused(why));
    }
    if matches!(req, Request::Shutdown { .. }) {
        // nixvm answers just before it exits: wait for the connection to close.
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print() {
        assert_eq!(parse(r#"{"cmd":"ping"}"#), Ok(Request::Ping));
        assert_eq!(
            parse(r#"{"cmd":"shutdown","timeout":5}"#),
            Ok(Request::Shutdown { timeout: Some(5) })
        );
        assert_eq!(
            parse(r#"{"cmd":"shutdown"}"#),
            Ok(Request::Shutdown { timeout: None })
        );
        for bad in [
            "",
            "{}",
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"shutdown","timeout":"soon"}"#,
            "[1]",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            serde_json::to_string(&Request::Shutdown { timeout: Some(3) }).unwrap(),
            r#"{"cmd":"shutdown","timeout":3}"#
        );
        assert_eq!(Answer::error("no").line(), r#"{"ok":false,"error":"no"}"#);
        let mut a = Answer::ok();
        a.result = Some(ShutdownResult::PoweredOff);
        assert_eq!(a.line(), r#"{"ok":true,"result":"powered-off"}"#);
        a.result = None;
        a.state = Some(State::ShuttingDown);
        let back: Answer = serde_json::from_str(&a.line()).unwrap();
        assert_eq!(back, a);
    }
}
