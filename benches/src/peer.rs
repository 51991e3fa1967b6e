//! A Python peer in a child process, spoken to in JSON lines: the experiments that run a
//! peer beside ours (sentence-transformers, PyTorch + PEFT, Avalanche) start it once and
//! alternate their rounds with its, so both sides see the same load on a shared machine.
//!
//! The peer prints one JSON object per line on stdout: a first line when it is ready, then
//! one answer per request line it reads on stdin; an answer with an `error` key is a
//! failure. Its stderr goes to `target/reuse-report/peers/<name>.log`, and every error
//! about the peer quotes that log's last lines.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A running peer.
pub struct Peer {
    name: String,
    child: Child,
    to: Option<ChildStdin>,
    from: BufReader<ChildStdout>,
    log: PathBuf,
    /// A line sent before closing stdin (for peers that wait for a `quit`).
    quit: Option<String>,
}

impl Peer {
    /// Starts `cmd` (a script and its arguments) as the peer `name`, with piped stdin and
    /// stdout, its stderr in `<report dir>/peers/<name>.log`, and no model hub reachable
    /// (`HF_HUB_OFFLINE=1`); waits for its first line and returns it with the peer.
    pub fn start(
        name: &str,
        report_dir: &std::path::Path,
        cmd: &mut Command,
    ) -> Result<(Self, Value)> {
        let dir = report_dir.join("peers");
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{name}.log"));
        let err =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting the {name} peer"))?;
        let to = child.stdin.take();
        let from = BufReader::new(child.stdout.take().context("peer without stdout")?);
        let mut peer = Self {
            name: name.to_string(),
            child,
            to,
            from,
            log,
            quit: None,
        };
        let ready = peer.read()?;
        Ok((peer, ready))
    }

    /// Sends `line` before closing stdin when the peer is dropped.
    pub fn quit_with(mut self, line: &str) -> Self {
        self.quit = Some(line.to_string());
        self
    }

    /// The next JSON line the peer prints; an `error` answer, an early exit or a line
    /// that is not JSON is an error quoting the peer's stderr.
    pub fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.from.read_line(&mut line)? == 0 {
            bail!("the {} peer exited early{}", self.name, self.stderr_tail());
        }
        let v: Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(e) => bail!(
                "the {} peer printed {line:?}, not a JSON line ({e}){}",
                self.name,
                self.stderr_tail()
            ),
        };
        if let Some(e) = v.get("error") {
            bail!("the {} peer failed: {e}{}", self.name, self.stderr_tail());
        }
        Ok(v)
    }

    /// Sends one request line and reads the answer.
    pub fn ask(&mut self, request: &str) -> Result<Value> {
        let to = self
            .to
            .as_mut()
            .with_context(|| format!("the {} peer's stdin is closed", self.name))?;
        writeln!(to, "{request}")?;
        to.flush()?;
        self.read()
            .with_context(|| format!("asking the {} peer {request:?}", self.name))
    }

    /// The last lines of the peer's stderr, for errors ("" when there are none).
    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
        format!("; its stderr ({}) ends:\n  {tail}", self.log.display())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let (Some(to), Some(q)) = (self.to.as_mut(), &self.quit) {
            let _ = writeln!(to, "{q}");
        }
        // Closing stdin ends the peer's loop.
        self.to.take();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn answers_in_json_lines_and_quotes_stderr_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, ready) = Peer::start(
            "echo",
            dir.path(),
            &mut sh(r#"echo '{"ready": true}'; while read l; do echo "{\"got\": \"$l\"}"; done"#),
        )
        .unwrap();
        assert_eq!(ready["ready"], true);
        assert_eq!(p.ask("run 3").unwrap()["got"], "run 3");
        drop(p);

        let (mut p, _) = Peer::start(
            "failing",
            dir.path(),
            &mut sh(r#"echo '{"ready": true}'; read l; echo 'Traceback: boom' >&2; echo '{"error": "bad run"}'"#),
        )
        .unwrap();
        let e = format!("{:#}", p.ask("run").unwrap_err());
        assert!(e.contains("bad run") && e.contains("boom"), "{e}");
        drop(p);

        let e = Peer::start(
            "mute",
            dir.path(),
            &mut sh("echo 'no module named torch' >&2"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("exited early") && e.contains("no module named torch"),
            "{e}"
        );
    }
}
