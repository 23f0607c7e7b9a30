//! Data loaders: IDX (Fashion-MNIST) and CIFAR-10 binary files written here,
//! gzipped or not; the error messages for broken files; the split and batch
//! helpers; downloads against a local HTTP server; finding data sets.
//!
//! Every comparison is exact (tolerance 0): pixels are bytes divided by 255
//! in `f32`, which the loaders must reproduce bit for bit.

mod common;

use common::{Rng, assert_err_mentions};
use flate2::{Compression, write::GzEncoder};
use kestrel::data::{
    self, CIFAR_RECORD_BYTES, Checksum, Dataset, DatasetName, Locator, validation_split_at,
};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

// ---------- file builders ----------

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// An IDX image file: magic 0x803, [n, rows, cols] big-endian, then pixels.
fn idx_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

/// An IDX label file: magic 0x801, [n] big-endian, then labels.
fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

/// Random bytes that always include 0 and 255, the ends of the range.
fn pixels(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    v[0] = 0;
    if len > 1 {
        v[len - 1] = 255;
    }
    v
}

fn labels(seed: u64, n: usize, classes: u8) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(classes as usize) as u8).collect()
}

/// The definition: Keras's `x.astype("float32") / 255`.
fn unit(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| b as f32 / 255.0f32).collect()
}

/// `1234` as `"1,234"`, as the error messages print sizes.
fn commas(n: usize) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// CIFAR records: one label byte, then 3,072 pixel bytes each.
fn cifar_records(seed: u64, labels: &[u8]) -> Vec<u8> {
    let px = pixels(seed, labels.len() * 3072);
    let mut v = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        v.push(l);
        v.extend_from_slice(&px[i * 3072..(i + 1) * 3072]);
    }
    v
}

const CIFAR_FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

/// The six CIFAR files with `per_file` records each; returns their bytes.
fn cifar_set(per_file: usize) -> Vec<(String, Vec<u8>)> {
    CIFAR_FILES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let l = labels(100 + i as u64, per_file, 10);
            (name.to_string(), cifar_records(200 + i as u64, &l))
        })
        .collect()
}

/// The expected samples of CIFAR records, from the layout definition:
/// value at (c, r, k) is byte 1 + c*1024 + r*32 + k of the record.
fn cifar_expected(records: &[u8]) -> (Vec<f32>, Vec<u32>) {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for rec in records.chunks(3073) {
        y.push(rec[0] as u32);
        for c in 0..3 {
            for r in 0..32 {
                for k in 0..32 {
                    x.push(rec[1 + c * 1024 + r * 32 + k] as f32 / 255.0);
                }
            }
        }
    }
    (x, y)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A Locator that sees only what the test puts in `data_dir`.
fn isolated(data_dir: &Path) -> Locator {
    Locator {
        data_dir: Some(data_dir.to_path_buf()),
        kestrel_data: None,
        debian_dir: None,
        home: None,
        base_url: None,
        download: false,
    }
}

// ---------- IDX ----------

#[test]
fn idx_round_trip_raw_and_gzip() {
    let (n, rows, cols) = (7u32, 5u32, 3u32);
    let px = pixels(1, (n * rows * cols) as usize);
    let lab = labels(2, n as usize, 10);
    let dir = tempfile::tempdir().unwrap();
    let img_bytes = idx_images(n, rows, cols, &px);
    let lab_bytes = idx_labels(&lab);
    // Raw, gzipped with .gz, and gzipped under a plain name: the gzip magic,
    // not the name, decides.
    let cases = [
        ("raw", img_bytes.clone(), lab_bytes.clone()),
        ("gz.gz", gzip(&img_bytes), gzip(&lab_bytes)),
        ("gz-no-suffix", gzip(&img_bytes), gzip(&lab_bytes)),
    ];
    for (name, img, labf) in cases {
        let ip = dir.path().join(format!("img-{name}"));
        let lp = dir.path().join(format!("lab-{name}"));
        write(&ip, &img);
        write(&lp, &labf);
        let got = data::load_idx_images(&ip).unwrap();
        assert_eq!((got.count, got.rows, got.cols), (7, 5, 3), "{name}");
        assert_eq!(got.pixels, px, "{name}: pixel bytes");
        assert_eq!(got.to_unit_f32(), unit(&px), "{name}: /255 scaling");
        assert_eq!(data::load_idx_labels(&lp).unwrap(), lab, "{name}: labels");

        let set = data::load_idx_dataset(&ip, &lp, 10).unwrap();
        assert_eq!(set.sample_shape, vec![1, 5, 3]);
        assert_eq!(set.len(), 7);
        assert_eq!(set.classes, 10);
        assert_eq!(set.x, unit(&px), "{name}: dataset pixels");
        assert_eq!(set.y, lab.iter().map(|&l| l as u32).collect::<Vec<_>>());
        // The ends of the byte range map exactly onto the ends of [0, 1].
        assert_eq!(set.x[0], 0.0);
        assert_eq!(*set.x.last().unwrap(), 1.0);
    }
}

#[test]
fn fashion_mnist_loader_on_a_tiny_set() {
    let dir = tempfile::tempdir().unwrap();
    let (ntrain, ntest) = (3usize, 2usize);
    let train_px = pixels(3, ntrain * 784);
    let test_px = pixels(4, ntest * 784);
    let train_lab = labels(5, ntrain, 10);
    let test_lab = vec![9u8, 0];
    // A mix of gzipped and raw files, as a hand-made directory might hold.
    let files: [(&str, Vec<u8>); 4] = [
        (
            "train-images-idx3-ubyte.gz",
            gzip(&idx_images(ntrain as u32, 28, 28, &train_px)),
        ),
        ("train-labels-idx1-ubyte", idx_labels(&train_lab)),
        (
            "t10k-images-idx3-ubyte",
            idx_images(ntest as u32, 28, 28, &test_px),
        ),
        ("t10k-labels-idx1-ubyte.gz", gzip(&idx_labels(&test_lab))),
    ];
    for (name, bytes) in &files {
        write(&dir.path().join(name), bytes);
    }
    let (train, test) = data::load_fashion_mnist(dir.path()).unwrap();
    assert_eq!(train.sample_shape, vec![1, 28, 28]);
    assert_eq!(test.sample_shape, vec![1, 28, 28]);
    assert_eq!((train.len(), test.len()), (3, 2));
    assert_eq!(train.x, unit(&train_px));
    assert_eq!(test.x, unit(&test_px));
    assert_eq!(test.y, vec![9, 0]);
    assert_eq!(
        train.y,
        train_lab.iter().map(|&l| l as u32).collect::<Vec<_>>()
    );

    // Not 28x28: named as such.
    write(
        &dir.path().join("t10k-images-idx3-ubyte"),
        &idx_images(2, 4, 4, &pixels(6, 32)),
    );
    assert_err_mentions(
        data::load_fashion_mnist(dir.path()),
        "t10k-images-idx3-ubyte",
        &["4x4", "28x28"],
    );

    // A missing file is named.
    let empty = tempfile::tempdir().unwrap();
    assert_err_mentions(
        data::load_fashion_mnist(empty.path()),
        "train-images-idx3-ubyte",
        &["not found"],
    );
}

#[test]
fn idx_truncated_files_name_file_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    // The real header (60,000 images of 28x28) over 1,000 bytes in all.
    let mut short = idx_images(60_000, 28, 28, &[]);
    short.resize(1000, 7);

    let raw = dir.path().join("train-images-idx3-ubyte");
    write(&raw, &short);
    assert_err_mentions(
        data::load_idx_images(&raw),
        "train-images-idx3-ubyte",
        &[
            "1,000 bytes",
            "expected 47,040,016",
            "60,000 images of 28x28",
        ],
    );

    // Gzipped: a complete gzip stream of too little data.
    let gz = dir.path().join("train-images-idx3-ubyte.gz");
    write(&gz, &gzip(&short));
    assert_err_mentions(
        data::load_idx_images(&gz),
        "train-images-idx3-ubyte.gz",
        &[
            "1,000 bytes after decompression",
            "expected 47,040,016 for 60,000 images of 28x28",
        ],
    );

    // Gzipped and cut short on disk: the stream itself is broken.
    let full = idx_images(3, 28, 28, &pixels(7, 3 * 784));
    let mut cut = gzip(&full);
    let cut_len = cut.len() / 2;
    cut.truncate(cut_len);
    let broken = dir.path().join("cut-images.gz");
    write(&broken, &cut);
    assert_err_mentions(
        data::load_idx_images(&broken),
        "cut-images.gz",
        &[
            "expected 2,368 for 3 images of 28x28",
            "truncated or corrupt",
            &format!("{} bytes on disk", commas(cut_len)),
        ],
    );
    assert_err_mentions(
        data::read_maybe_gzip(&broken),
        "cut-images.gz",
        &["truncated or corrupt"],
    );

    // Too short for the header.
    let tiny = dir.path().join("tiny-images");
    write(&tiny, &[0, 0, 8, 3, 0, 0]);
    assert_err_mentions(
        data::load_idx_images(&tiny),
        "tiny-images",
        &["6 bytes", "16-byte header"],
    );

    // Trailing bytes are as wrong as missing ones.
    let mut long = idx_labels(&[1, 2, 3]);
    long.push(0);
    let lp = dir.path().join("long-labels");
    write(&lp, &long);
    assert_err_mentions(
        data::load_idx_labels(&lp),
        "long-labels",
        &["12 bytes", "expected 11 for 3 labels"],
    );
}

#[test]
fn idx_bad_magic_names_found_and_expected() {
    let dir = tempfile::tempdir().unwrap();
    let lp = dir.path().join("labels-not-images");
    write(&lp, &idx_labels(&[1, 2]));
    assert_err_mentions(
        data::load_idx_images(&lp),
        "labels-not-images",
        &[
            "magic number 0x00000801",
            "expected 0x00000803",
            "label file",
        ],
    );
    let ip = dir.path().join("images-not-labels.gz");
    write(&ip, &gzip(&idx_images(1, 1, 1, &[5])));
    assert_err_mentions(
        data::load_idx_labels(&ip),
        "images-not-labels.gz",
        &["magic number 0x00000803", "expected 0x00000801"],
    );
    let junk = dir.path().join("junk");
    write(&junk, b"hello world, not idx");
    assert_err_mentions(
        data::load_idx_labels(&junk),
        "junk",
        &["magic number 0x68656c6c", "expected 0x00000801"],
    );
}

#[test]
fn idx_label_count_and_range_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ip = dir.path().join("imgs");
    let lp = dir.path().join("labs");
    write(&ip, &idx_images(4, 2, 2, &pixels(8, 16)));
    write(&lp, &idx_labels(&[1, 2, 3]));
    assert_err_mentions(
        data::load_idx_dataset(&ip, &lp, 10),
        "labs",
        &["3 labels", "imgs", "4 images"],
    );
    write(&lp, &idx_labels(&[1, 2, 10, 3]));
    assert_err_mentions(
        data::load_idx_dataset(&ip, &lp, 10),
        "labs",
        &["label 10 at index 2", "below 10"],
    );
}

// ---------- CIFAR-10 ----------

#[test]
fn cifar_bin_file_any_whole_number_of_records() {
    let dir = tempfile::tempdir().unwrap();
    let recs = cifar_records(9, &[3, 0, 9]);
    let p = dir.path().join("three.bin");
    write(&p, &recs);
    let set = data::load_cifar_bin_file(&p).unwrap();
    let (x, y) = cifar_expected(&recs);
    assert_eq!(set.sample_shape, vec![3, 32, 32]);
    assert_eq!(set.classes, 10);
    assert_eq!(set.y, y);
    assert_eq!(set.x, x);

    let mut partial = recs.clone();
    partial.truncate(2 * CIFAR_RECORD_BYTES + 5);
    write(&p, &partial);
    assert_err_mentions(
        data::load_cifar_bin_file(&p),
        "three.bin",
        &[
            "6,151 bytes",
            "3,073-byte records",
            "2 records and 5 bytes left over",
        ],
    );

    write(&p, &cifar_records(10, &[1, 10]));
    assert_err_mentions(
        data::load_cifar_bin_file(&p),
        "three.bin",
        &["label 10 at index 1", "below 10"],
    );

    write(&p, &[]);
    assert_err_mentions(data::load_cifar_bin_file(&p), "three.bin", &["0 bytes"]);
}

#[test]
fn cifar10_loader_on_a_tiny_set() {
    let dir = tempfile::tempdir().unwrap();
    let files = cifar_set(2);
    for (name, bytes) in &files {
        write(&dir.path().join(name), bytes);
    }
    let (train, test) = data::load_cifar10_dir(dir.path(), None).unwrap();
    let train_records: Vec<u8> = files[..5].iter().flat_map(|(_, b)| b.clone()).collect();
    let (tx, ty) = cifar_expected(&train_records);
    let (sx, sy) = cifar_expected(&files[5].1);
    assert_eq!(train.len(), 10);
    assert_eq!(test.len(), 2);
    assert_eq!((train.x, train.y), (tx, ty), "train in file order 1..5");
    assert_eq!((test.x, test.y), (sx, sy));
    assert_eq!(test.sample_shape, vec![3, 32, 32]);

    // The real loader insists on 10,000 records per file.
    assert_err_mentions(
        data::load_cifar10(dir.path()),
        "data_batch_1.bin",
        &["6,146 bytes", "expected 30,730,000", "10,000 records"],
    );
    assert_err_mentions(
        data::load_cifar10_dir(dir.path(), Some(3)),
        "data_batch_1.bin",
        &["6,146 bytes", "expected 9,219 for 3 records"],
    );

    // Found in DIR/cifar-10-batches-bin too.
    let outer = tempfile::tempdir().unwrap();
    let inner = outer.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&inner).unwrap();
    for (name, bytes) in &files {
        write(&inner.join(name), bytes);
    }
    let (train2, _) = data::load_cifar10_dir(outer.path(), None).unwrap();
    assert_eq!(train2.len(), 10);

    // A missing file is named.
    std::fs::remove_file(inner.join("data_batch_4.bin")).unwrap();
    assert_err_mentions(
        data::load_cifar10_dir(outer.path(), None),
        "data_batch_4.bin",
        &["not found"],
    );
}

fn cifar_tarball(files: &[(String, Vec<u8>)], top: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("{top}/{name}"), bytes.as_slice())
            .unwrap();
    }
    let meta = b"airplane\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(meta.len() as u64);
    header.set_cksum();
    builder
        .append_data(&mut header, format!("{top}/batches.meta.txt"), &meta[..])
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn cifar10_from_the_official_tarball_layout() {
    let files = cifar_set(1);
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("cifar-10-binary.tar.gz"),
        &cifar_tarball(&files, "cifar-10-batches-bin"),
    );
    let (train, test) = data::load_cifar10_dir(dir.path(), None).unwrap();
    let train_records: Vec<u8> = files[..5].iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!((train.x, train.y), cifar_expected(&train_records));
    assert_eq!((test.x, test.y), cifar_expected(&files[5].1));
    let extracted = dir.path().join("cifar-10-batches-bin");
    let mut want: Vec<String> = CIFAR_FILES.iter().map(|s| s.to_string()).collect();
    want.push("batches.meta.txt".into());
    want.sort();
    assert_eq!(
        files_in(&extracted),
        want,
        "only the members, no temp files"
    );

    // The tarball given directly.
    let direct = tempfile::tempdir().unwrap();
    let tb = direct.path().join("my-copy.tar.gz");
    write(&tb, &cifar_tarball(&files, "cifar-10-batches-bin"));
    assert_eq!(
        data::cifar10_files_dir(&tb).unwrap(),
        Some(direct.path().join("cifar-10-batches-bin"))
    );

    // A tarball of another layout (the python version's directory).
    let wrong = tempfile::tempdir().unwrap();
    write(
        &wrong.path().join("cifar-10-binary.tar.gz"),
        &cifar_tarball(&files, "cifar-10-batches-py"),
    );
    assert_err_mentions(
        data::load_cifar10_dir(wrong.path(), None),
        "cifar-10-binary.tar.gz",
        &["lacks", "data_batch_1.bin", "test_batch.bin"],
    );

    // Not a tarball at all.
    let junk = tempfile::tempdir().unwrap();
    write(&junk.path().join("cifar-10-binary.tar.gz"), b"not gzip");
    assert_err_mentions(
        data::load_cifar10_dir(junk.path(), None),
        "cifar-10-binary.tar.gz",
        &["8 bytes", "gzipped tar"],
    );
}

// ---------- Dataset helpers ----------

fn tiny_set(n: usize) -> Dataset {
    // Sample i is [i, i + 0.5] so every value says where it came from.
    let x: Vec<f32> = (0..n).flat_map(|i| [i as f32, i as f32 + 0.5]).collect();
    let y: Vec<u32> = (0..n).map(|i| (i % 3) as u32).collect();
    Dataset::new(x, y, vec![2], 3).unwrap()
}

#[test]
fn validation_split_matches_keras() {
    // int(n * (1. - validation_split)), values computed by Python 3.
    let cases = [
        (10, 0.2, 8),
        (10, 0.3, 7),
        (3, 0.1, 2),
        (7, 0.3, 4),
        (60_000, 0.1, 54_000),
        (60_000, 0.2, 48_000),
        (50_000, 0.1, 45_000),
        (100, 0.07, 93),
        (101, 0.33, 67),
        (1, 0.5, 0),
        (5, 0.0, 5),
        (49, 0.3, 34),
        (9, 0.9, 0),
    ];
    for (n, f, want) in cases {
        assert_eq!(validation_split_at(n, f).unwrap(), want, "n={n} f={f}");
    }
    // The validation set is the last fraction, in order.
    let (train, val) = tiny_set(10).split_last_fraction(0.3).unwrap();
    assert_eq!((train.len(), val.len()), (7, 3));
    assert_eq!(val.x, vec![7.0, 7.5, 8.0, 8.5, 9.0, 9.5]);
    assert_eq!(val.y, vec![1, 2, 0]);
    assert_eq!(train.x[..4], [0.0, 0.5, 1.0, 1.5]);
    assert_eq!(val.sample_shape, vec![2]);
    assert_eq!(val.classes, 3);

    for bad in [1.0, -0.1, f64::NAN, 1.5] {
        assert_err_mentions(
            tiny_set(4).split_last_fraction(bad),
            "split_last_fraction",
            &["[0, 1)"],
        );
    }
}

#[test]
fn split_first_takes_the_first_k() {
    let (first, rest) = tiny_set(6).split_first(2).unwrap();
    assert_eq!(first.x, vec![0.0, 0.5, 1.0, 1.5]);
    assert_eq!(first.y, vec![0, 1]);
    assert_eq!(rest.len(), 4);
    assert_eq!(rest.x[0], 2.0);
    assert_eq!(rest.y, vec![2, 0, 1, 2]);
    let (all, none) = tiny_set(3).split_first(3).unwrap();
    assert_eq!((all.len(), none.len()), (3, 0));
    assert_err_mentions(
        tiny_set(3).split_first(4),
        "split_first",
        &["4", "3 samples"],
    );
}

#[test]
fn batches_one_hot_and_checks() {
    let set = tiny_set(5);
    assert_eq!(set.len(), 5);
    assert_eq!(set.sample_len(), 2);
    assert_eq!(set.sample(3), Some(&[3.0, 3.5][..]));
    assert_eq!(set.sample(5), None);
    assert_eq!(set.batch_shape(4), vec![4, 2]);

    let b = set.gather(&[4, 0, 4]).unwrap();
    assert_eq!(b.x, vec![4.0, 4.5, 0.0, 0.5, 4.0, 4.5]);
    assert_eq!(b.y, vec![1, 0, 1]);
    assert_eq!(b.shape, vec![3, 2]);
    assert_eq!(
        b.one_hot(3).unwrap(),
        vec![0., 1., 0., 1., 0., 0., 0., 1., 0.]
    );

    // Reused buffers are fully overwritten.
    let mut x = vec![f32::NAN; 4];
    let mut y = vec![99u32; 2];
    set.gather_into(&[2, 1], &mut x, &mut y).unwrap();
    assert_eq!((x, y), (vec![2.0, 2.5, 1.0, 1.5], vec![2, 1]));
    assert_err_mentions(
        set.gather_into(&[2, 1], &mut [0.0; 3], &mut [0; 2]),
        "dataset.gather",
        &["expected 4", "got 3"],
    );
    assert_err_mentions(
        set.gather(&[0, 5]),
        "dataset.gather",
        &["index 5", "5 samples"],
    );

    let (rx, ry) = set.rows(1..3).unwrap();
    assert_eq!((rx, ry), (&[1.0, 1.5, 2.0, 2.5][..], &[1u32, 2][..]));
    assert_err_mentions(set.rows(4..6), "dataset.rows", &["4..6", "5 samples"]);

    let oh = set.one_hot();
    assert_eq!(oh.len(), 15);
    for (i, row) in oh.chunks(3).enumerate() {
        let mut want = [0.0f32; 3];
        want[i % 3] = 1.0;
        assert_eq!(row, want, "row {i}");
    }
    assert_err_mentions(
        data::one_hot(&[0, 3], 3),
        "one_hot",
        &["label 3 at index 1", "3 classes"],
    );

    assert_err_mentions(
        Dataset::new(vec![0.0; 5], vec![0, 1], vec![2], 3),
        "dataset.new",
        &["expected 4", "got 5"],
    );
    assert_err_mentions(
        Dataset::new(vec![0.0; 4], vec![0, 3], vec![2], 3),
        "dataset.new",
        &["label 3 at index 1"],
    );
}

// ---------- downloads ----------

/// A one-thread HTTP/1.1 server on 127.0.0.1 answering `connections`
/// requests, then stopping: `path` gets `body`, anything else a 404.
/// Returns the base URL and the list of request paths seen.
fn serve(
    path: &'static str,
    body: Vec<u8>,
    connections: usize,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(stream) = stream else { continue };
            let _ = answer(stream, path, &body, &log);
        }
    });
    (base, seen)
}

fn answer(
    mut stream: TcpStream,
    path: &str,
    body: &[u8],
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let got = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(got.clone());
    if got == path {
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body)?;
    } else {
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
    }
    stream.flush()
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn download_checks_checksums_and_writes_atomically() {
    let payload = gzip(&idx_labels(&labels(11, 300, 10)));
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("made-by-download");

    // md5 matching (upper case accepted): the file lands, nothing else.
    let (base, seen) = serve("/x/labels.gz", payload.clone(), 1);
    let dest = sub.join("labels.gz");
    let md5 = md5_hex(&payload).to_uppercase();
    data::download(&format!("{base}/x/labels.gz"), &dest, &Checksum::Md5(md5)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), payload);
    assert_eq!(files_in(&sub), vec!["labels.gz"]);
    assert_eq!(*seen.lock().unwrap(), vec!["/x/labels.gz"]);
    assert_eq!(data::load_idx_labels(&dest).unwrap().len(), 300);

    // sha256 matching.
    let (base, _) = serve("/labels.gz", payload.clone(), 1);
    let dest2 = sub.join("again.gz");
    let sha = sha256_hex(&payload);
    data::download(&format!("{base}/labels.gz"), &dest2, &Checksum::Sha256(sha)).unwrap();
    assert_eq!(std::fs::read(&dest2).unwrap(), payload);

    // Mismatch: an error giving both digests, and no file left behind.
    let (base, _) = serve("/labels.gz", payload.clone(), 1);
    let dest3 = sub.join("bad.gz");
    let wrong = "0123456789abcdef0123456789abcdef";
    assert_err_mentions(
        data::download(
            &format!("{base}/labels.gz"),
            &dest3,
            &Checksum::Md5(wrong.into()),
        ),
        "bad.gz",
        &["checksum mismatch", wrong, &md5_hex(&payload), "not kept"],
    );
    assert!(!dest3.exists());
    assert_eq!(
        files_in(&sub),
        vec!["again.gz", "labels.gz"],
        "no temp file"
    );

    // HTTP 404: an error naming the URL, no file.
    let (base, _) = serve("/labels.gz", payload.clone(), 1);
    let dest4 = sub.join("missing.gz");
    let url = format!("{base}/nope.gz");
    assert_err_mentions(
        data::download(&url, &dest4, &Checksum::Md5(wrong.into())),
        "missing.gz",
        &[&url, "404"],
    );
    assert_eq!(files_in(&sub), vec!["again.gz", "labels.gz"]);
}

/// A base URL on which nothing listens (the port was just freed).
fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/")
}

// ---------- locating ----------

#[test]
fn locate_finds_data_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let fm = dir.path().join("fashion-mnist");
    std::fs::create_dir(&fm).unwrap();
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        write(&fm.join(name), b"");
    }
    let loc = isolated(dir.path());
    assert_eq!(loc.locate(DatasetName::FashionMnist).unwrap(), fm);

    write(
        &dir.path().join("cifar-10-binary.tar.gz"),
        &cifar_tarball(&cifar_set(1), "cifar-10-batches-bin"),
    );
    assert_eq!(
        loc.locate(DatasetName::Cifar10).unwrap(),
        dir.path().join("cifar-10-batches-bin")
    );

    // Without --data, $KESTREL_DATA is searched like it.
    let loc2 = Locator {
        data_dir: None,
        kestrel_data: Some(dir.path().to_path_buf()),
        ..isolated(dir.path())
    };
    assert_eq!(loc2.locate(DatasetName::FashionMnist).unwrap(), fm);

    assert_eq!(
        "Fashion-MNIST".parse::<DatasetName>().unwrap(),
        DatasetName::FashionMnist
    );
    assert_eq!(
        "cifar10".parse::<DatasetName>().unwrap(),
        DatasetName::Cifar10
    );
    assert_err_mentions("mnist".parse::<DatasetName>(), "mnist", &["fashion_mnist"]);
}

#[test]
fn locate_not_found_says_how_to_get_the_data() {
    let data_dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".keras/datasets/cifar-10-batches-py")).unwrap();
    let loc = Locator {
        data_dir: None,
        kestrel_data: Some(data_dir.path().to_path_buf()),
        debian_dir: Some(data_dir.path().join("no-debian-here")),
        home: Some(home.path().to_path_buf()),
        base_url: Some(dead_url()),
        download: true,
    };
    let dd = data_dir.path().display().to_string();
    assert_err_mentions(
        loc.locate(DatasetName::FashionMnist),
        "Fashion-MNIST not found",
        &[
            &dd,
            "no-debian-here",
            ".keras/datasets/fashion-mnist",
            "downloading it failed",
            "apt-get install dataset-fashion-mnist",
            "/usr/share/datasets/fashion-mnist",
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz",
            &format!("into {dd}/fashion-mnist/"),
            &format!("--data {dd}"),
        ],
    );
    assert_err_mentions(
        loc.locate(DatasetName::Cifar10),
        "CIFAR-10 (binary version) not found",
        &[
            "cifar-10-batches-py",
            "python (pickle)",
            "downloading it failed",
            "cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
            &format!("python3 ../shared/data/cifar10_to_bin.py {dd}/cifar-10-batches-bin"),
            &format!("--data {dd}"),
        ],
    );
    // Without a download the official URLs are named.
    let offline = Locator {
        download: false,
        base_url: None,
        ..loc.clone()
    };
    assert_err_mentions(
        offline.locate(DatasetName::Cifar10),
        "not found",
        &[
            "downloading is turned off",
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        ],
    );
    assert_err_mentions(
        offline.locate(DatasetName::FashionMnist),
        "not found",
        &["https://storage.googleapis.com/tensorflow/tf-keras-datasets/"],
    );
    // Nothing was left in the download directory.
    let left: Vec<String> = files_in(data_dir.path())
        .into_iter()
        .flat_map(|d| {
            let p = data_dir.path().join(&d);
            if p.is_dir() { files_in(&p) } else { vec![d] }
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn locate_download_uses_the_base_url_and_the_published_checksum() {
    // The server hands out a file that is not the real one: the request goes
    // to BASE/train-images-idx3-ubyte.gz and the md5 check rejects it.
    let (base, seen) = serve(
        "/mirror/train-images-idx3-ubyte.gz",
        gzip(b"not fashion-mnist"),
        1,
    );
    let data_dir = tempfile::tempdir().unwrap();
    let loc = Locator {
        data_dir: None,
        kestrel_data: Some(data_dir.path().to_path_buf()),
        base_url: Some(format!("{base}/mirror")),
        download: true,
        ..isolated(data_dir.path())
    };
    assert_err_mentions(
        loc.locate(DatasetName::FashionMnist),
        "not found",
        &["checksum mismatch", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"],
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["/mirror/train-images-idx3-ubyte.gz"]
    );
    assert_eq!(
        files_in(&data_dir.path().join("fashion-mnist")),
        Vec::<String>::new()
    );
}

/// `--data DIR` is authoritative: an empty, missing or incomplete DIR is an
/// error naming the directory or the missing file and the files expected,
/// even when another copy (here a Debian-like directory with every file)
/// and a download are at hand; nothing is written into DIR.
#[test]
fn data_dir_is_authoritative() {
    let other = tempfile::tempdir().unwrap();
    for name in data::FASHION_MNIST_FILES {
        write(&other.path().join(name), b"");
    }
    let dir = tempfile::tempdir().unwrap();
    let loc = |d: &Path| Locator {
        data_dir: Some(d.to_path_buf()),
        kestrel_data: Some(other.path().to_path_buf()),
        debian_dir: Some(other.path().to_path_buf()),
        home: None,
        base_url: Some(dead_url()),
        download: true,
    };
    // Missing.
    let missing = dir.path().join("nope");
    assert_err_mentions(
        loc(&missing).locate(DatasetName::FashionMnist),
        "no such directory",
        &[
            &missing.display().to_string(),
            "train-images-idx3-ubyte[.gz]",
        ],
    );
    assert_err_mentions(
        loc(&missing).locate(DatasetName::Cifar10),
        "no such directory",
        &["cifar-10-batches-bin", "cifar-10-binary.tar.gz"],
    );
    // Empty.
    assert_err_mentions(
        loc(dir.path()).locate(DatasetName::FashionMnist),
        "files missing",
        &[
            "train-images-idx3-ubyte[.gz]",
            "t10k-labels-idx1-ubyte[.gz]",
            "expected all four",
        ],
    );
    // Some of the files: the missing one is named, the others are not.
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
    ] {
        write(&dir.path().join(name), b"");
    }
    let e = loc(dir.path())
        .locate(DatasetName::FashionMnist)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("file missing: t10k-labels-idx1-ubyte[.gz]"),
        "{e}"
    );
    assert!(
        e.contains(
            &dir.path()
                .join("t10k-labels-idx1-ubyte.gz")
                .display()
                .to_string()
        ),
        "{e}"
    );
    // CIFAR-10 with one batch file short.
    let cdir = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&cdir).unwrap();
    for f in data::CIFAR10_TRAIN_FILES.iter().take(4) {
        write(&cdir.join(f), b"");
    }
    assert_err_mentions(
        loc(dir.path()).locate(DatasetName::Cifar10),
        "incomplete",
        &[
            "data_batch_5.bin",
            "test_batch.bin",
            "cifar-10-binary.tar.gz",
        ],
    );
    // Nothing was downloaded into DIR.
    assert!(!dir.path().join("fashion-mnist").exists());
    assert!(!dir.path().join("cifar-10-binary.tar.gz").exists());
    // All four there: DIR is used, not the other copy.
    write(&dir.path().join("t10k-labels-idx1-ubyte.gz"), b"");
    assert_eq!(
        loc(dir.path()).locate(DatasetName::FashionMnist).unwrap(),
        dir.path()
    );
}

/// The files a data set was loaded from, with their SHA-256.
#[test]
fn data_files_have_sizes_and_checksums() {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in data::FASHION_MNIST_FILES.iter().enumerate() {
        let n = if i == 1 {
            format!("{name}.gz")
        } else {
            name.to_string()
        };
        write(&dir.path().join(n), b"abc");
    }
    let files = data::data_files(DatasetName::FashionMnist, dir.path()).unwrap();
    assert_eq!(files.len(), 4);
    assert!(files[1].path.ends_with("train-labels-idx1-ubyte.gz"));
    for f in &files {
        assert_eq!(f.bytes, 3);
        // sha256("abc"), from FIPS 180-2.
        assert_eq!(
            f.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

// ---------- the real data, where installed ----------

const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn real_fashion_mnist_when_installed() {
    let dir = PathBuf::from(DEBIAN_FASHION_MNIST);
    if !dir.is_dir() {
        println!(
            "note: {DEBIAN_FASHION_MNIST} absent, real Fashion-MNIST not checked \
             (apt-get install dataset-fashion-mnist)"
        );
        return;
    }
    let loc = Locator {
        data_dir: None,
        kestrel_data: None,
        debian_dir: Some(dir.clone()),
        home: None,
        base_url: None,
        download: false,
    };
    assert_eq!(loc.locate(DatasetName::FashionMnist).unwrap(), dir);
    let (train, test) = data::load_fashion_mnist(&dir).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.sample_shape, vec![1, 28, 28]);
    assert_eq!(train.x.len(), 60_000 * 784);
    // First labels: 9 (ankle boot) in both sets; checked with Python's gzip.
    assert_eq!(train.y[..6], [9, 0, 0, 3, 0, 2]);
    assert_eq!(test.y[..6], [9, 2, 1, 1, 6, 1]);
    // Byte sum of the first training image, also from Python.
    let sum: u32 = train.x[..784]
        .iter()
        .map(|&v| (v * 255.0).round() as u32)
        .sum();
    assert_eq!(sum, 76_247);
    for set in [&train, &test] {
        assert!(set.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(set.x.iter().cloned().fold(f32::MIN, f32::max), 1.0);
        assert!(set.y.iter().all(|&l| l < 10));
    }
    // Keras's usual validation set: the first 5,000 training images.
    let (val, rest) = train.split_first(5000).unwrap();
    assert_eq!((val.len(), rest.len()), (5000, 55_000));
    assert_eq!(val.y[0], 9);
}
