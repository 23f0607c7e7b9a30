//! The one error type of kestrel.
//!
//! Every public function returns [`Result`]. User input (shapes, arguments,
//! files, configs) never panics: it comes back as an [`Error`] that names the
//! op or file, what was given, and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong in kestrel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer or dimension does not have the size the op needs.
    #[error("{op}: {what}: expected {expected}, got {got}")]
    Shape {
        /// The op that rejected its input, e.g. `"conv2d.forward"`.
        op: &'static str,
        /// Which argument was wrong, e.g. `"input length"`.
        what: String,
        /// What the op expected, in words or numbers.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// An argument outside its domain (a negative rate, a zero stride...).
    #[error("{op}: invalid {arg}: {msg}")]
    InvalidArgument {
        /// The op that rejected the argument.
        op: &'static str,
        /// The argument's name.
        arg: &'static str,
        /// What was wrong and what would be accepted.
        msg: String,
    },
    /// A CUDA driver or kernel failure, with enough context to reproduce it.
    #[error(
        "CUDA error in {kernel} (compute capability {compute_capability}, driver {driver}): {msg}"
    )]
    Cuda {
        /// The kernel or driver call that failed.
        kernel: String,
        /// e.g. `"9.0"`, or `"unknown"` when no device was opened.
        compute_capability: String,
        /// e.g. `"13.0"`, or `"unknown"`.
        driver: String,
        /// The driver's message.
        msg: String,
    },
    /// A file that could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file that was read but holds something other than what it should.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What was wrong, with the sizes found and expected.
        msg: String,
    },
    /// A configuration (model, optimizer, run config) that cannot be used.
    #[error("config: {0}")]
    Config(String),
}

/// kestrel's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Shape`] from anything printable.
    pub fn shape(
        op: &'static str,
        what: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        Error::Shape {
            op,
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, arg: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            msg: msg.into(),
        }
    }
}

/// Checks that a buffer holds exactly `expected` elements.
pub fn check_len(op: &'static str, what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::shape(op, format!("{what} length"), expected, got))
    }
}

/// Multiplies dimensions, failing instead of overflowing.
pub fn checked_product(op: &'static str, what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d).ok_or_else(|| {
            Error::invalid(
                op,
                "shape",
                format!("{what} {dims:?} has more elements than fit in usize"),
            )
        })
    })
}
