//! The floor under a process pool: two processes doing ping-pong over a plain Unix stream
//! socket, no framework. Rows `process.*.raw_uds`.
//!
//! The echo server is this binary, re-executed with [`ENV_ECHO`] naming the socket to connect
//! to; `main` checks it right after `offload::init()`. Messages are a little-endian `u32`
//! length and that many bytes (like offload's frames). The client writes a message in one
//! `write` and reads the answer with blocking reads; the server reads what arrives and
//! writes each complete message back in one `write`. That is the least a round trip between
//! two processes costs: two writes, two blocking reads, two wake-ups.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

/// Set in the echo server's environment: the path of the socket to connect to.
pub(crate) const ENV_ECHO: &str = "OFFLOAD_BENCH_RAW_ECHO";

/// Bytes of a message's length prefix.
const HEADER: usize = 4;

/// Serves as the echo server when this process was started as one; returns otherwise.
pub(crate) fn serve_if_asked() {
    let Some(path) = std::env::var_os(ENV_ECHO) else {
        return;
    };
    let code = match serve(&PathBuf::from(path)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("offload-bench raw echo server: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Echoes every message until the client closes the connection.
fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    // `buf[..end]` holds bytes received and not yet echoed; a message starts at 0.
    let mut end = 0;
    loop {
        let want = message_len(&buf[..end]).map_or(HEADER, |len| HEADER + len);
        if end >= HEADER && end >= want {
            // A whole message: back in one write.
            stream.write_all(&buf[..want])?;
            buf.copy_within(want..end, 0);
            end -= want;
            continue;
        }
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let n = match stream.read(&mut buf[end..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        end += n;
    }
}

fn message_len(buf: &[u8]) -> Option<usize> {
    let header: [u8; HEADER] = buf.get(..HEADER)?.try_into().ok()?;
    Some(u32::from_le_bytes(header) as usize)
}

/// The client end, with the echo server process it talks to.
pub(crate) struct RawEcho {
    stream: Option<UnixStream>,
    child: Child,
    /// Reused for every message sent, and for every answer.
    out: Vec<u8>,
    back: Vec<u8>,
}

impl RawEcho {
    /// Starts the echo server (this binary again) and connects to it.
    pub(crate) fn start() -> anyhow::Result<RawEcho> {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "offload-bench-raw-{}-{}.sock",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let child = Command::new(std::env::current_exe()?)
            .env(ENV_ECHO, &path)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start the raw echo server");
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let mut echo = RawEcho {
            stream: None,
            child,
            out: Vec::new(),
            back: Vec::new(),
        };
        let accepted = echo.accept(&listener);
        let _ = std::fs::remove_file(&path);
        echo.stream = Some(accepted?);
        Ok(echo)
    }

    /// Waits up to 10 s for the server to connect, noticing if it died.
    fn accept(&mut self, listener: &UnixListener) -> anyhow::Result<UnixStream> {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the raw echo server exited before connecting: {status}");
            }
            if Instant::now() > deadline {
                bail!("the raw echo server did not connect within 10 s");
            }
            // Short: the startup row times this wait.
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Sets the message sent by [`roundtrip`](Self::roundtrip): `len` bytes of a pattern.
    pub(crate) fn set_message(&mut self, len: usize) {
        self.out.clear();
        self.out
            .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        self.out.extend((0..len).map(|i| i as u8));
        self.back.resize(self.out.len(), 0);
    }

    /// Sends the message and waits for it to come back; checks that it did, unchanged.
    pub(crate) fn roundtrip(&mut self) -> anyhow::Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            bail!("the raw echo server is not connected");
        };
        stream.write_all(&self.out)?;
        stream.read_exact(&mut self.back)?;
        Ok(())
    }

    /// True when the last answer equals the message (checked outside any timed section).
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        ensure!(self.back == self.out, "the raw echo came back changed");
        Ok(())
    }
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        // The server exits at end of stream.
        drop(self.stream.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
