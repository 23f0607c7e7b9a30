//! kernels/ptx/manifest.json against the Rust side and the PTX (no GPU).
//!
//! The manifest is what a framework in another language launches the PTX
//! from, so its struct layouts must be the `#[repr(C)]` mirrors' layouts
//! (size, alignment, every field's offset and size), its enums the Rust
//! enums' values, and its entries exactly the PTX's `.entry` points with
//! their parameter sizes.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::{align_of, offset_of, size_of};

use kestrel::cuda::MODULES;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn manifest() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/ptx/manifest.json");
    let text = std::fs::read_to_string(path).expect("kernels/ptx/manifest.json (run ci/ptx)");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

fn u(v: &Value) -> usize {
    v.as_u64().expect("an unsigned integer") as usize
}

/// The size of a field, from an accessor (no value of the struct needed).
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// A Rust type's layout: size, alignment, and (name, offset, size) per field.
struct Layout {
    size: usize,
    align: usize,
    fields: Vec<(&'static str, usize, usize)>,
}

macro_rules! layout {
    ($t:ty { $($f:ident),* $(,)? }) => {
        Layout {
            size: size_of::<$t>(),
            align: align_of::<$t>(),
            fields: vec![$((stringify!($f), offset_of!($t, $f), field_size(|s: &$t| &s.$f))),*],
        }
    };
}

/// The public `#[repr(C)]` mirrors of the structs kernels take, by their C name.
fn rust_layouts() -> BTreeMap<&'static str, Layout> {
    use kestrel::ops::activation::{Activation, Softmax};
    use kestrel::ops::batchnorm::BatchNorm;
    use kestrel::ops::bias::BiasShape;
    use kestrel::ops::conv::Conv2d;
    use kestrel::ops::conv::cuda::ConvGather;
    use kestrel::ops::dropout::Dropout;
    use kestrel::ops::gemm::Gemm;
    use kestrel::ops::loss::LossParams;
    use kestrel::ops::optim::StepScalars;
    use kestrel::ops::pool::MaxPool2d;
    // OptTensor is private to ops::optim::cuda, which reports its layout.
    let (size, align, fields) = kestrel::ops::optim::cuda::opt_tensor_layout();
    let opt_tensor = Layout {
        size,
        align,
        fields,
    };
    BTreeMap::from([
        ("OptTensor", opt_tensor),
        ("Activation", layout!(Activation { kind, alpha })),
        ("Softmax", layout!(Softmax { rows, cols })),
        (
            "BatchNorm",
            layout!(BatchNorm {
                n,
                c,
                spatial,
                is_conv,
                momentum,
                epsilon,
                variance_mode
            }),
        ),
        ("BiasShape", layout!(BiasShape { n, c, spatial })),
        (
            "Conv2d",
            layout!(Conv2d {
                n,
                c,
                h,
                w,
                k,
                r,
                s,
                stride_h,
                stride_w,
                pad_top,
                pad_bottom,
                pad_left,
                pad_right,
                out_h,
                out_w,
            }),
        ),
        (
            "ConvGather",
            layout!(ConvGather {
                m,
                n,
                kdim,
                lda,
                cols_per_img,
                qw,
                in_img,
                in_plane,
                in_row,
                in_h,
                in_w,
                y_mul,
                y_off,
                x_mul,
                x_off,
                kb,
                ke,
                dir,
                out_img,
                out_plane,
                out_row,
                oy_mul,
                oy_off,
                ox_mul,
                ox_off,
            }),
        ),
        (
            "Dropout",
            layout!(Dropout {
                len,
                rate,
                seed,
                offset
            }),
        ),
        (
            "Gemm",
            layout!(Gemm {
                m,
                n,
                k,
                lda,
                ldb,
                ldc,
                batch,
                stride_a,
                stride_b,
                stride_c,
                alpha,
                beta,
                trans_a,
                trans_b,
            }),
        ),
        (
            "LossParams",
            layout!(LossParams {
                n,
                classes,
                grad_scale
            }),
        ),
        (
            "MaxPool2d",
            layout!(MaxPool2d {
                n,
                c,
                h,
                w,
                pool_h,
                pool_w,
                stride_h,
                stride_w,
                pad_top,
                pad_bottom,
                pad_left,
                pad_right,
                out_h,
                out_w,
            }),
        ),
        (
            "StepScalars",
            layout!(StepScalars {
                kind,
                nesterov,
                clipvalue_first,
                lr_t,
                adam_step,
                momentum,
                rho,
                one_minus_rho,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                epsilon,
                clip_scale,
                clipvalue,
            }),
        ),
    ])
}

#[test]
fn struct_layouts_match_the_rust_mirrors() {
    let m = manifest();
    let structs = m["structs"].as_object().expect("structs");
    let rust = rust_layouts();
    let mut checked = BTreeSet::new();
    for (name, s) in structs {
        let r = rust
            .get(name.as_str())
            .unwrap_or_else(|| panic!("manifest struct {name} has no Rust mirror in this test"));
        assert_eq!(u(&s["size"]), r.size, "{name}: size");
        assert_eq!(u(&s["align"]), r.align, "{name}: alignment");
        let fields: Vec<(&str, usize, usize)> = s["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .map(|f| (f["name"].as_str().unwrap(), u(&f["offset"]), u(&f["size"])))
            .collect();
        assert_eq!(
            fields, r.fields,
            "{name}: fields (name, offset, size) in order"
        );
        checked.insert(name.as_str());
    }
    let missing: Vec<_> = rust.keys().filter(|k| !checked.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "Rust mirrors absent from the manifest: {missing:?}"
    );
}

#[test]
fn enum_values_match_the_rust_enums() {
    use kestrel::ops::activation::ActivationKind as A;
    use kestrel::ops::batchnorm::VarianceMode as V;
    use kestrel::ops::optim::OptimizerKind as O;
    type Values = Vec<(&'static str, u32)>;
    let rust: BTreeMap<&str, (usize, Values)> = BTreeMap::from([
        (
            "ActivationKind",
            (
                size_of::<A>(),
                vec![
                    ("ACT_LINEAR", A::Linear as u32),
                    ("ACT_RELU", A::Relu as u32),
                    ("ACT_ELU", A::Elu as u32),
                    ("ACT_LEAKY_RELU", A::LeakyRelu as u32),
                    ("ACT_TANH", A::Tanh as u32),
                    ("ACT_SIGMOID", A::Sigmoid as u32),
                ],
            ),
        ),
        (
            "VarianceMode",
            (
                size_of::<V>(),
                vec![
                    ("VAR_KERAS", V::Keras as u32),
                    ("VAR_KERAS_FUSED", V::KerasFused as u32),
                    ("VAR_TF_KERAS", V::TfKeras as u32),
                    ("VAR_BIASED", V::Biased as u32),
                    ("VAR_UNBIASED", V::Unbiased as u32),
                ],
            ),
        ),
        (
            "OptimizerKind",
            (
                size_of::<O>(),
                vec![
                    ("OPT_SGD", O::Sgd as u32),
                    ("OPT_ADAGRAD", O::Adagrad as u32),
                    ("OPT_RMSPROP", O::RmsProp as u32),
                    ("OPT_ADAM", O::Adam as u32),
                ],
            ),
        ),
    ]);
    let m = manifest();
    let enums = m["enums"].as_object().expect("enums");
    let names: BTreeSet<&str> = enums.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        rust.keys().copied().collect(),
        "enums in the manifest"
    );
    for (name, e) in enums {
        let (size, values) = &rust[name.as_str()];
        assert_eq!(e["type"], "u32", "{name}: underlying type");
        assert_eq!(*size, 4, "{name}: the Rust enum is #[repr(u32)]");
        let got: Vec<(&str, u32)> = e["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), u(&v["value"]) as u32))
            .collect();
        assert_eq!(&got, values, "{name}: values");
    }
}

/// Every `.entry` of a PTX text with its parameters' byte sizes.
fn ptx_entries(ptx: &str) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line
            .strip_prefix(".visible .entry ")
            .or_else(|| line.strip_prefix(".weak .entry "))
        else {
            continue;
        };
        let name = rest.trim_end_matches('(').to_string();
        let mut sizes = Vec::new();
        for p in lines.by_ref() {
            let p = p.trim().trim_end_matches(',');
            if p.starts_with(')') {
                break;
            }
            // `.param .u64 x_param_1` or `.param .align 8 .b8 x_param_0[24]`.
            let words: Vec<&str> = p.split_whitespace().collect();
            let ty = words[words.len() - 2];
            let bits: usize = ty
                .trim_start_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap();
            let count = words[words.len() - 1]
                .split_once('[')
                .map_or(1, |(_, n)| n.trim_end_matches(']').parse().unwrap());
            sizes.push(bits / 8 * count);
        }
        out.insert(name, sizes);
    }
    out
}

#[test]
fn every_ptx_entry_is_in_the_manifest() {
    let m = manifest();
    let modules = m["modules"].as_array().expect("modules");
    let in_manifest: BTreeSet<&str> = modules
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    let built_in: BTreeSet<&str> = MODULES.iter().map(|m| m.name).collect();
    assert_eq!(
        in_manifest, built_in,
        "the manifest's modules are the library's"
    );
    for module in MODULES {
        let mm = modules.iter().find(|m| m["name"] == module.name).unwrap();
        let name = module.name;
        let file = mm["file"].as_str().unwrap();
        assert_eq!(file, format!("{name}.ptx"));
        let sha: String = Sha256::digest(module.ptx.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            mm["sha256"],
            sha.as_str(),
            "{name}: the manifest is of this PTX"
        );
        let cc = mm["min_compute_capability"].as_array().unwrap();
        assert_eq!(
            (
                cc[0].as_i64().unwrap() as i32,
                cc[1].as_i64().unwrap() as i32
            ),
            module.min_compute_capability,
            "{name}: minimum compute capability"
        );
        let ptx = ptx_entries(module.ptx);
        assert!(!ptx.is_empty(), "{name}.ptx has no entries");
        let entries: BTreeMap<&str, &Value> = mm["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        let names: BTreeSet<&str> = entries.keys().copied().collect();
        let ptx_names: BTreeSet<&str> = ptx.keys().map(String::as_str).collect();
        assert_eq!(names, ptx_names, "{name}: entries");
        for (entry, sizes) in &ptx {
            let params = entries[entry.as_str()]["params"].as_array().unwrap();
            let got: Vec<usize> = params.iter().map(|p| u(&p["size"])).collect();
            assert_eq!(&got, sizes, "{name}: {entry}'s parameter sizes");
            for p in params {
                if let Some(s) = p["struct"].as_str() {
                    assert!(
                        m["structs"].get(s).is_some(),
                        "{entry}: struct {s} has a layout"
                    );
                    if p["kind"] == "struct" {
                        assert_eq!(p["size"], m["structs"][s]["size"], "{entry}: {s} by value");
                    }
                }
            }
        }
    }
}
