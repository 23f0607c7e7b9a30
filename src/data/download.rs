//! Downloading a data file: streamed to a temporary file beside its
//! destination, checked against its published checksum, then renamed into
//! place, so the destination either holds a verified file or nothing.

use super::{file_name, thousands};
use crate::error::{Error, Result};
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A published checksum of a file, as lowercase or uppercase hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// An MD5 digest (32 hex digits).
    Md5(String),
    /// A SHA-256 digest (64 hex digits).
    Sha256(String),
}

impl Checksum {
    fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5",
            Checksum::Sha256(_) => "sha256",
        }
    }

    fn hex(&self) -> String {
        match self {
            Checksum::Md5(h) | Checksum::Sha256(h) => h.to_ascii_lowercase(),
        }
    }

    fn hasher(&self) -> Hasher {
        use sha2::Digest;
        match self {
            Checksum::Md5(_) => Hasher::Md5(md5::Md5::new()),
            Checksum::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
        }
    }
}

enum Hasher {
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    fn hex(self) -> String {
        use sha2::Digest;
        let bytes: Vec<u8> = match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A progress line on stderr: bytes, percent (when the size is known) and
/// rate. On a terminal it redraws in place; elsewhere (CI logs) it prints
/// one line at the start and one at the end.
struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    start: Instant,
    last_draw: Instant,
    tty: bool,
}

fn mb(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

impl Progress {
    fn new(label: String, total: Option<u64>) -> Self {
        let tty = std::io::stderr().is_terminal();
        if !tty {
            let size = total.map(mb).unwrap_or_else(|| "unknown size".into());
            eprintln!("{label}: downloading ({size})");
        }
        let now = Instant::now();
        Progress {
            label,
            total,
            done: 0,
            start: now,
            last_draw: now,
            tty,
        }
    }

    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = format!("{}/s", mb((self.done as f64 / secs) as u64));
        match self.total {
            Some(t) if t > 0 => {
                let frac = (self.done as f64 / t as f64).min(1.0);
                const WIDTH: usize = 30;
                let filled = (frac * WIDTH as f64) as usize;
                let bar: String = (0..WIDTH)
                    .map(|i| match i.cmp(&filled) {
                        std::cmp::Ordering::Less => '=',
                        std::cmp::Ordering::Equal => '>',
                        std::cmp::Ordering::Greater => ' ',
                    })
                    .collect();
                format!(
                    "{}: [{bar}] {} / {} {:3.0}% {rate}",
                    self.label,
                    mb(self.done),
                    mb(t),
                    frac * 100.0
                )
            }
            _ => format!("{}: {} {rate}", self.label, mb(self.done)),
        }
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        if self.tty && self.last_draw.elapsed() >= Duration::from_millis(100) {
            self.last_draw = Instant::now();
            eprint!("\r{}", self.line());
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!("\r{}", self.line());
        } else {
            eprintln!("{}", self.line());
        }
    }
}

fn net_err(dest: &Path, url: &str, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: dest.to_path_buf(),
        source: std::io::Error::other(format!("downloading {url} failed: {e}")),
    }
}

/// Downloads `url` to `dest`, with a progress bar on stderr, and keeps it
/// only when its digest matches `checksum`.
///
/// The bytes go to a temporary file in `dest`'s directory (created when
/// missing) and are renamed to `dest` after the check, so `dest` never
/// holds a partial or unverified file; on any failure the temporary file is
/// removed. A checksum mismatch is an [`Error::Format`] giving both digests.
pub fn download(url: &str, dest: &Path, checksum: &Checksum) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| Error::io(dir, source))?;
    // A `tempfile` beside `dest`: removed when dropped (any early return
    // below), renamed over `dest` by `persist` once verified.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.download-", file_name(dest)))
        .tempfile_in(dir)
        .map_err(|source| Error::io(dir, source))?;
    let tmp_path = tmp.path().to_path_buf();
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .new_agent();
    let mut response = agent.get(url).call().map_err(|e| net_err(dest, url, e))?;
    let body = response.body_mut();
    let total = body.content_length();
    let mut reader = body.as_reader();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
    let mut hasher = checksum.hasher();
    let mut progress = Progress::new(file_name(dest), total);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(net_err(dest, url, e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|source| Error::io(&tmp_path, source))?;
        progress.advance(n as u64);
    }
    progress.finish();
    let file = out.into_inner().map_err(|e| Error::Io {
        path: tmp_path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all()
        .map_err(|source| Error::io(&tmp_path, source))?;
    if let Some(t) = total
        && t != progress.done
    {
        return Err(net_err(
            dest,
            url,
            format!(
                "received {} bytes, the server announced {}",
                thousands(progress.done),
                thousands(t)
            ),
        ));
    }
    let got = hasher.hex();
    if got != checksum.hex() {
        return Err(Error::Format {
            path: dest.to_path_buf(),
            msg: format!(
                "checksum mismatch for {url}: {alg} {got}, expected {alg} {} \
                 ({} bytes downloaded; the file was not kept)",
                checksum.hex(),
                thousands(progress.done),
                alg = checksum.algorithm()
            ),
        });
    }
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    Ok(())
}
