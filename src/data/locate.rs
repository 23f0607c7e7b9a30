//! Finding a data set on disk, or downloading it like Keras does.

use super::cifar::{CIFAR10_DIR, CIFAR10_TARBALL, cifar10_files_dir, missing_files};
use super::download::{Checksum, download};
use super::idx::{FASHION_MNIST_FILES, find_plain_or_gz};
use super::{Dataset, load_cifar10, load_fashion_mnist};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Where Keras downloads Fashion-MNIST from (`keras.datasets.fashion_mnist`).
pub const FASHION_MNIST_URL_BASE: &str =
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/";
/// Where the CIFAR-10 archive is published (its authors' page).
pub const CIFAR10_URL_BASE: &str = "https://www.cs.toronto.edu/~kriz/";
/// MD5 of the published `cifar-10-binary.tar.gz`, from the authors' page.
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
/// MD5 of the four published Fashion-MNIST files, from the table in
/// Zalando's README (the same values torchvision checks).
pub const FASHION_MNIST_MD5: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
];
/// Debian's package `dataset-fashion-mnist` installs the files here.
const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
const FASHION_DIR: &str = "fashion-mnist";

/// The data sets kestrel can find and load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetName {
    /// Fashion-MNIST: 60,000 + 10,000 grayscale 28x28 images, 10 classes.
    FashionMnist,
    /// CIFAR-10 (binary version): 50,000 + 10,000 RGB 32x32 images, 10 classes.
    Cifar10,
}

impl DatasetName {
    /// The name used in messages and accepted by [`std::str::FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            DatasetName::FashionMnist => "fashion_mnist",
            DatasetName::Cifar10 => "cifar10",
        }
    }
}

impl std::str::FromStr for DatasetName {
    type Err = Error;

    /// Accepts `fashion_mnist` / `fashion-mnist` and `cifar10` / `cifar-10`,
    /// in any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "fashion_mnist" => Ok(DatasetName::FashionMnist),
            "cifar10" | "cifar_10" => Ok(DatasetName::Cifar10),
            _ => Err(Error::Config(format!(
                "unknown data set {s:?}: expected fashion_mnist or cifar10"
            ))),
        }
    }
}

/// Where to look for data sets, and where to download them from.
///
/// [`Locator::from_env`] fills it the usual way; tests build one by hand so
/// that the machine's own files and network stay out of the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// `--data DIR`: searched first (`DIR`, then `DIR/fashion-mnist` or
    /// `DIR/cifar-10-batches-bin` and `DIR/cifar-10-binary.tar.gz`), and
    /// where a download goes when given.
    pub data_dir: Option<PathBuf>,
    /// `$KESTREL_DATA`: searched like `data_dir`, right after it.
    pub kestrel_data: Option<PathBuf>,
    /// Debian's Fashion-MNIST directory, or `None` to skip it.
    pub debian_dir: Option<PathBuf>,
    /// The home directory whose `.keras/datasets` (Keras's cache) is
    /// searched, and where a download goes when neither directory above is
    /// set; `None` to skip.
    pub home: Option<PathBuf>,
    /// The base URL to download from instead of the official one
    /// (`$KESTREL_DATA_URL`); file names are appended to it.
    pub base_url: Option<String>,
    /// Whether to download a data set found nowhere.
    pub download: bool,
}

impl Locator {
    /// The usual places: `data_dir` (`--data`), `$KESTREL_DATA`, Debian's
    /// `/usr/share/datasets`, `$HOME/.keras/datasets`; downloads from the
    /// official sources, or from `$KESTREL_DATA_URL` when set.
    ///
    /// `$KESTREL_DATA` comes before the system directories because setting
    /// it is an explicit choice, which a system-wide copy should not beat.
    pub fn from_env(data_dir: Option<&Path>) -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Locator {
            data_dir: data_dir.map(Path::to_path_buf),
            kestrel_data: var("KESTREL_DATA").map(PathBuf::from),
            debian_dir: Some(PathBuf::from(DEBIAN_FASHION_MNIST)),
            home: var("HOME").map(PathBuf::from),
            base_url: var("KESTREL_DATA_URL").map(|v| v.to_string_lossy().into_owned()),
            download: true,
        }
    }

    fn keras_dir(&self) -> Option<PathBuf> {
        self.home
            .as_ref()
            .map(|h| h.join(".keras").join("datasets"))
    }

    /// The roots searched first (`--data`, `$KESTREL_DATA`), with a label.
    fn roots(&self) -> Vec<(PathBuf, &'static str)> {
        let mut roots = Vec::new();
        if let Some(d) = &self.data_dir {
            roots.push((d.clone(), "--data"));
        }
        if let Some(d) = &self.kestrel_data {
            roots.push((d.clone(), "$KESTREL_DATA"));
        }
        roots
    }

    /// Where a download of `dataset` goes: the first of `--data`,
    /// `$KESTREL_DATA`, `~/.keras/datasets`.
    pub fn download_root(&self) -> Option<PathBuf> {
        self.data_dir
            .clone()
            .or_else(|| self.kestrel_data.clone())
            .or_else(|| self.keras_dir())
    }

    /// The URL a download fetches: the override base when set.
    fn url(&self, dataset: DatasetName, file: &str) -> String {
        join_url(
            self.base_url.as_deref().unwrap_or(official_base(dataset)),
            file,
        )
    }

    /// How to point kestrel at a directory under `root` in the guidance:
    /// Keras's cache is searched anyway, anything else needs `--data`.
    fn then_pass(&self, root: Option<&Path>) -> String {
        match root {
            Some(r) if Some(r) == self.keras_dir().as_deref() => {
                "(kestrel looks there by itself)".into()
            }
            Some(r) => format!("pass `--data {}`", r.display()),
            None => "pass `--data DIR`".into(),
        }
    }

    /// The directory holding `dataset`'s files, ready for
    /// [`load_fashion_mnist`] or [`load_cifar10`]: found in the places
    /// listed on [`Locator`], or downloaded (with a progress bar on stderr
    /// and a checksum check) when found nowhere. When that fails too, the
    /// error lists every place looked at and says how to get the data.
    pub fn locate(&self, dataset: DatasetName) -> Result<PathBuf> {
        match dataset {
            DatasetName::FashionMnist => self.locate_fashion(),
            DatasetName::Cifar10 => self.locate_cifar(),
        }
    }

    fn locate_fashion(&self) -> Result<PathBuf> {
        let mut candidates: Vec<(PathBuf, String)> = Vec::new();
        for (root, label) in self.roots() {
            candidates.push((root.clone(), label.to_string()));
            candidates.push((root.join(FASHION_DIR), label.to_string()));
        }
        if let Some(d) = &self.debian_dir {
            candidates.push((d.clone(), "Debian's dataset-fashion-mnist".into()));
        }
        if let Some(k) = self.keras_dir() {
            candidates.push((k.join(FASHION_DIR), "Keras's cache".into()));
        }
        let mut looked = Vec::new();
        for (dir, label) in &candidates {
            let missing: Vec<&str> = FASHION_MNIST_FILES
                .iter()
                .copied()
                .filter(|f| find_plain_or_gz(dir, f).is_none())
                .collect();
            if missing.is_empty() {
                return Ok(dir.clone());
            }
            let state = if !dir.is_dir() {
                "no such directory".to_string()
            } else {
                format!("missing {}", missing.join("[.gz], ") + "[.gz]")
            };
            looked.push(format!("  {} ({label}): {state}", dir.display()));
        }
        self.no_keras_note(&mut looked);
        if self.kestrel_data.is_none() {
            looked.push("  $KESTREL_DATA: not set".into());
        }

        let dest = self.download_root().map(|r| r.join(FASHION_DIR));
        let failure = match (&dest, self.download) {
            (_, false) => "downloading is turned off".to_string(),
            (None, true) => {
                "no directory to download into (no --data, $KESTREL_DATA or $HOME)".into()
            }
            (Some(dir), true) => match self.download_fashion(dir) {
                Ok(()) => return Ok(dir.clone()),
                Err(e) => format!("downloading it failed: {e}"),
            },
        };
        let into = dest
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "DIR/fashion-mnist".into());
        let files: Vec<String> = FASHION_MNIST_FILES
            .iter()
            .map(|f| format!("{f}.gz"))
            .collect();
        let msg = format!(
            "Fashion-MNIST not found. Looked in:\n{}\n{failure}.\nTo get it, either:\n  \
             - install Debian's package: `apt-get install dataset-fashion-mnist` \
             (it puts the four files in {DEBIAN_FASHION_MNIST}), or\n  \
             - download {} from {FASHION_MNIST_URL_BASE} into {into}/, then {}.",
            looked.join("\n"),
            files.join(", "),
            self.then_pass(dest.as_ref().and_then(|d| d.parent())),
        );
        Err(not_found(
            dest.unwrap_or_else(|| PathBuf::from(FASHION_DIR)),
            msg,
        ))
    }

    fn download_fashion(&self, dir: &Path) -> Result<()> {
        for (name, md5) in FASHION_MNIST_MD5 {
            let plain = name.trim_end_matches(".gz");
            if find_plain_or_gz(dir, plain).is_some() {
                continue;
            }
            let url = self.url(DatasetName::FashionMnist, name);
            download(&url, &dir.join(name), &Checksum::Md5(md5.into()))?;
        }
        Ok(())
    }

    /// Notes Keras's python-pickle CIFAR-10, which kestrel cannot read.
    fn no_keras_note(&self, looked: &mut Vec<String>) {
        if let Some(k) = self.keras_dir() {
            let py = k.join("cifar-10-batches-py");
            if py.is_dir() {
                looked.push(format!(
                    "  {} (Keras's cache): the python (pickle) version of CIFAR-10, \
                     which kestrel does not read; it needs the binary version",
                    py.display()
                ));
            }
        }
    }

    fn locate_cifar(&self) -> Result<PathBuf> {
        let mut candidates: Vec<(PathBuf, String)> = self
            .roots()
            .into_iter()
            .map(|(r, l)| (r, l.to_string()))
            .collect();
        if let Some(k) = self.keras_dir() {
            candidates.push((k, "Keras's cache".into()));
        }
        let mut looked = Vec::new();
        for (dir, label) in &candidates {
            if let Some(found) = cifar10_files_dir(dir)? {
                return Ok(found);
            }
            let state = if !dir.exists() {
                "no such directory".to_string()
            } else {
                format!(
                    "no {CIFAR10_TARBALL}, and {}/ misses {}",
                    CIFAR10_DIR,
                    missing_files(&dir.join(CIFAR10_DIR)).join(", ")
                )
            };
            looked.push(format!("  {} ({label}): {state}", dir.display()));
        }
        self.no_keras_note(&mut looked);
        if self.kestrel_data.is_none() {
            looked.push("  $KESTREL_DATA: not set".into());
        }

        let root = self.download_root();
        let url = self.url(DatasetName::Cifar10, CIFAR10_TARBALL);
        let official = join_url(CIFAR10_URL_BASE, CIFAR10_TARBALL);
        let failure = match (&root, self.download) {
            (_, false) => "downloading is turned off".to_string(),
            (None, true) => {
                "no directory to download into (no --data, $KESTREL_DATA or $HOME)".into()
            }
            (Some(root), true) => {
                let tarball = root.join(CIFAR10_TARBALL);
                match download(&url, &tarball, &Checksum::Md5(CIFAR10_MD5.into()))
                    .and_then(|()| cifar10_files_dir(root))
                {
                    Ok(Some(dir)) => return Ok(dir),
                    Ok(None) => format!("{} did not hold the files", tarball.display()),
                    Err(e) => format!("downloading it failed: {e}"),
                }
            }
        };
        let dir = root
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "DIR".into());
        let msg = format!(
            "CIFAR-10 (binary version) not found. Looked in:\n{}\n{failure}.\nTo get it, either:\n  \
             - download {official} (md5 {CIFAR10_MD5}) into {dir}/ (kestrel extracts it), \
             or extract it there so that {dir}/{CIFAR10_DIR}/ holds data_batch_1.bin .. \
             data_batch_5.bin and test_batch.bin; or\n  \
             - convert the JPEG copy: `python3 ../shared/data/cifar10_to_bin.py {dir}/{CIFAR10_DIR}` \
             (needs Pillow);\nthen {}.",
            looked.join("\n"),
            self.then_pass(root.as_deref()),
        );
        Err(not_found(
            root.unwrap_or_else(|| PathBuf::from(CIFAR10_DIR)),
            msg,
        ))
    }
}

fn official_base(dataset: DatasetName) -> &'static str {
    match dataset {
        DatasetName::FashionMnist => FASHION_MNIST_URL_BASE,
        DatasetName::Cifar10 => CIFAR10_URL_BASE,
    }
}

fn join_url(base: &str, file: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{file}")
    } else {
        format!("{base}/{file}")
    }
}

fn not_found(path: PathBuf, msg: String) -> Error {
    Error::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::NotFound, msg),
    }
}

/// The directory holding `dataset`'s files: [`Locator::from_env`] with
/// `data_dir` (`--data DIR`), then [`Locator::locate`].
pub fn locate(dataset: DatasetName, data_dir: Option<&Path>) -> Result<PathBuf> {
    Locator::from_env(data_dir).locate(dataset)
}

/// Finds (or downloads) and loads `dataset`: `(train, test)`.
pub fn load(dataset: DatasetName, data_dir: Option<&Path>) -> Result<(Dataset, Dataset)> {
    let dir = locate(dataset, data_dir)?;
    match dataset {
        DatasetName::FashionMnist => load_fashion_mnist(&dir),
        DatasetName::Cifar10 => load_cifar10(&dir),
    }
}
