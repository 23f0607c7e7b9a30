//! Finding a data set on disk, or downloading it like Keras does.

use super::cifar::{
    CIFAR10_DIR, CIFAR10_TARBALL, CIFAR10_TEST_FILE, cifar10_files_dir, missing_files,
};
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
    /// `--data DIR`: authoritative when given. The data set must be in
    /// `DIR` (or `DIR/fashion-mnist`, or `DIR/cifar-10-batches-bin` /
    /// `DIR/cifar-10-binary.tar.gz`); nothing else is searched and nothing is
    /// downloaded, and a missing file is an error naming it.
    pub data_dir: Option<PathBuf>,
    /// `$KESTREL_DATA`: searched first when there is no `data_dir` (`DIR`,
    /// then `DIR/fashion-mnist` or `DIR/cifar-10-batches-bin` and
    /// `DIR/cifar-10-binary.tar.gz`), and where a download goes.
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
    /// `data_dir` (`--data`) alone when given; otherwise the usual places:
    /// `$KESTREL_DATA`, Debian's `/usr/share/datasets`,
    /// `$HOME/.keras/datasets`, and downloads from the official sources, or
    /// from `$KESTREL_DATA_URL` when set.
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

    /// The root searched first when there is no `--data` (`$KESTREL_DATA`),
    /// with a label.
    fn roots(&self) -> Vec<(PathBuf, &'static str)> {
        let mut roots = Vec::new();
        if let Some(d) = &self.kestrel_data {
            roots.push((d.clone(), "$KESTREL_DATA"));
        }
        roots
    }

    /// Where a download goes: `$KESTREL_DATA`, else `~/.keras/datasets`
    /// (never `--data`, which must already hold the files).
    pub fn download_root(&self) -> Option<PathBuf> {
        self.kestrel_data.clone().or_else(|| self.keras_dir())
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
    /// [`load_fashion_mnist`] or [`load_cifar10`]. With `data_dir`
    /// (`--data`), that directory only: a missing directory or file is an
    /// error naming it and the files expected. Otherwise found in the places
    /// listed on [`Locator`], or downloaded (with a progress bar on stderr
    /// and a checksum check) when found nowhere; when that fails too, the
    /// error lists every place looked at and says how to get the data.
    pub fn locate(&self, dataset: DatasetName) -> Result<PathBuf> {
        if let Some(dir) = &self.data_dir {
            return match dataset {
                DatasetName::FashionMnist => fashion_in(dir),
                DatasetName::Cifar10 => cifar_in(dir),
            };
        }
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

/// `--data DIR` for Fashion-MNIST: `DIR` when it holds any of the four
/// files, else `DIR/fashion-mnist` when that does; all four must be there.
fn fashion_in(root: &Path) -> Result<PathBuf> {
    let expected = FASHION_MNIST_FILES
        .iter()
        .map(|f| format!("{f}[.gz]"))
        .collect::<Vec<_>>()
        .join(", ");
    let how = "or leave out --data to search the usual places (and download into \
               $KESTREL_DATA or ~/.keras/datasets)";
    if !root.is_dir() {
        return Err(not_found(
            root.to_path_buf(),
            format!(
                "--data: no such directory; expected a directory holding Fashion-MNIST's \
                 {expected}; fix the path, {how}"
            ),
        ));
    }
    let holds_any = |d: &Path| {
        FASHION_MNIST_FILES
            .iter()
            .any(|f| find_plain_or_gz(d, f).is_some())
    };
    let sub = root.join(FASHION_DIR);
    let dir = if !holds_any(root) && holds_any(&sub) {
        sub
    } else {
        root.to_path_buf()
    };
    let missing: Vec<&str> = FASHION_MNIST_FILES
        .iter()
        .copied()
        .filter(|f| find_plain_or_gz(&dir, f).is_none())
        .collect();
    if let Some(first) = missing.first() {
        return Err(not_found(
            dir.join(format!("{first}.gz")),
            format!(
                "--data {}: Fashion-MNIST file{} missing: {} (expected all four of {expected}, \
                 in {} or {}/{FASHION_DIR}); put them there, {how}",
                root.display(),
                if missing.len() == 1 { "" } else { "s" },
                missing
                    .iter()
                    .map(|f| format!("{f}[.gz]"))
                    .collect::<Vec<_>>()
                    .join(", "),
                root.display(),
                root.display(),
            ),
        ));
    }
    Ok(dir)
}

/// `--data DIR` for CIFAR-10: the binary files in `DIR` or
/// `DIR/cifar-10-batches-bin`, or the official tarball in `DIR`.
fn cifar_in(root: &Path) -> Result<PathBuf> {
    let expected = format!(
        "{}/ holding data_batch_1.bin .. data_batch_5.bin and test_batch.bin, or {CIFAR10_TARBALL}",
        CIFAR10_DIR
    );
    let how = "or leave out --data to search the usual places (and download into \
               $KESTREL_DATA or ~/.keras/datasets)";
    if !root.exists() {
        return Err(not_found(
            root.to_path_buf(),
            format!("--data: no such directory; expected {expected}; fix the path, {how}"),
        ));
    }
    if let Some(found) = cifar10_files_dir(root)? {
        return Ok(found);
    }
    let in_root = missing_files(root);
    let sub = root.join(CIFAR10_DIR);
    let (dir, missing) = if sub.is_dir() || in_root.len() == 6 {
        (sub.clone(), missing_files(&sub))
    } else {
        (root.to_path_buf(), in_root)
    };
    Err(not_found(
        dir.join(missing.first().copied().unwrap_or(CIFAR10_TEST_FILE)),
        format!(
            "--data {}: CIFAR-10 (binary version) incomplete: {} misses {} and there is no \
             {CIFAR10_TARBALL}; expected {expected}; put them there, {how}",
            root.display(),
            dir.display(),
            missing.join(", "),
        ),
    ))
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

/// A file a data set was loaded from: its path, size and SHA-256, as a run
/// records them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataFile {
    /// The file as found.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

impl DataFile {
    /// Reads `path` and computes its checksum.
    pub fn of(path: &Path) -> Result<Self> {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            h.update(&buf[..n]);
        }
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(DataFile {
            path: path.to_path_buf(),
            bytes,
            sha256,
        })
    }
}

/// The files of `dataset` in `dir` (as [`Locator::locate`] returns it), in
/// the order the loader reads them, each with its checksum.
pub fn data_files(dataset: DatasetName, dir: &Path) -> Result<Vec<DataFile>> {
    let paths: Vec<PathBuf> = match dataset {
        DatasetName::FashionMnist => FASHION_MNIST_FILES
            .iter()
            .map(|f| find_plain_or_gz(dir, f).unwrap_or_else(|| dir.join(f)))
            .collect(),
        DatasetName::Cifar10 => super::CIFAR10_TRAIN_FILES
            .iter()
            .chain([&CIFAR10_TEST_FILE])
            .map(|f| dir.join(f))
            .collect(),
    };
    paths.iter().map(|p| DataFile::of(p)).collect()
}

/// [`load`], and the files it read with their checksums.
pub fn load_recorded(
    dataset: DatasetName,
    data_dir: Option<&Path>,
) -> Result<(Dataset, Dataset, Vec<DataFile>)> {
    let dir = locate(dataset, data_dir)?;
    let (train, test) = match dataset {
        DatasetName::FashionMnist => load_fashion_mnist(&dir)?,
        DatasetName::Cifar10 => load_cifar10(&dir)?,
    };
    Ok((train, test, data_files(dataset, &dir)?))
}

/// Finds (or downloads) and loads `dataset`: `(train, test)`.
pub fn load(dataset: DatasetName, data_dir: Option<&Path>) -> Result<(Dataset, Dataset)> {
    let dir = locate(dataset, data_dir)?;
    match dataset {
        DatasetName::FashionMnist => load_fashion_mnist(&dir),
        DatasetName::Cifar10 => load_cifar10(&dir),
    }
}
