//! Launches `conv_im2col` from the PTX and `kernels/ptx/manifest.json` alone,
//! as a framework in another language would: no kestrel type, no Rust
//! mirror of `Conv2d`. The manifest names the module's PTX file, the entry's
//! parameters in order (with their sizes), and the byte layout of the
//! `Conv2d` struct it takes by value; the struct is packed into bytes from
//! those offsets and sizes, every argument is handed to `cuLaunchKernel` as
//! a pointer to its bytes, and the result is checked against a plain CPU
//! im2col.
//!
//!     cargo run --release --example gpu_manifest_launch [KERNELS_PTX_DIR]
//!
//! Exit status: 0 when every element matches, 1 on a mismatch or an error,
//! 2 without a CUDA driver (this program needs a device, real or emulated:
//! `ci/gpu-emu` runs it on kestrel's emulated device).

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::ExitCode;

use cudarc::driver::{CudaContext, DevicePtr, DevicePtrMut, result};
use cudarc::nvrtc::Ptx;
use serde_json::Value;

const MODULE: &str = "conv";
const ENTRY: &str = "conv_im2col";

type Failure = Box<dyn std::error::Error>;

/// The shape to run: field name -> value, as a framework's own config would
/// hold it. Strides 2 x 1 and uneven padding, so that every index term counts.
fn conv_fields() -> BTreeMap<&'static str, u64> {
    let (n, c, h, w, k, r, s) = (2, 3, 7, 6, 4, 3, 2);
    let (stride_h, stride_w) = (2, 1);
    let (pad_top, pad_bottom, pad_left, pad_right) = (1, 2, 0, 1);
    let out_h = (h + pad_top + pad_bottom - r) / stride_h + 1;
    let out_w = (w + pad_left + pad_right - s) / stride_w + 1;
    BTreeMap::from([
        ("n", n),
        ("c", c),
        ("h", h),
        ("w", w),
        ("k", k),
        ("r", r),
        ("s", s),
        ("stride_h", stride_h),
        ("stride_w", stride_w),
        ("pad_top", pad_top),
        ("pad_bottom", pad_bottom),
        ("pad_left", pad_left),
        ("pad_right", pad_right),
        ("out_h", out_h),
        ("out_w", out_w),
    ])
}

/// The struct's bytes from the manifest's layout: each field written at its
/// offset with its size (the padding stays zero).
fn pack_struct(layout: &Value, values: &BTreeMap<&str, u64>) -> Result<Vec<u8>, Failure> {
    let size = layout["size"].as_u64().ok_or("struct without a size")? as usize;
    let mut bytes = vec![0u8; size];
    for f in layout["fields"].as_array().ok_or("struct without fields")? {
        let name = f["name"].as_str().ok_or("field without a name")?;
        let off = f["offset"].as_u64().ok_or("field without an offset")? as usize;
        let len = f["size"].as_u64().ok_or("field without a size")? as usize;
        let ty = f["type"].as_str().unwrap_or("?");
        let v = *values
            .get(name)
            .ok_or_else(|| format!("no value for field {name}"))?;
        if !matches!((ty, len), ("u64", 8) | ("u32", 4)) {
            return Err(format!("field {name}: cannot pack C type {ty} of {len} bytes").into());
        }
        bytes[off..off + len].copy_from_slice(&v.to_le_bytes()[..len]);
    }
    Ok(bytes)
}

/// im2col on the CPU: col[(c*R + r)*S + s, (img*OH + oy)*OW + ox] =
/// x[img, c, oy*stride_h + r - pad_top, ox*stride_w + s - pad_left], 0 in the padding.
fn cpu_im2col(p: &BTreeMap<&str, u64>, x: &[f32]) -> Vec<f32> {
    let g = |k: &str| p[k] as usize;
    let (n, c, h, w, r, s) = (g("n"), g("c"), g("h"), g("w"), g("r"), g("s"));
    let (oh, ow) = (g("out_h"), g("out_w"));
    let cols = n * oh * ow;
    let mut col = vec![0.0f32; c * r * s * cols];
    for ch in 0..c {
        for kr in 0..r {
            for ks in 0..s {
                let row = (ch * r + kr) * s + ks;
                for img in 0..n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let iy = (oy * g("stride_h") + kr) as isize - g("pad_top") as isize;
                            let ix = (ox * g("stride_w") + ks) as isize - g("pad_left") as isize;
                            let inside =
                                iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                            col[row * cols + (img * oh + oy) * ow + ox] = if inside {
                                x[((img * c + ch) * h + iy as usize) * w + ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }
    col
}

fn run(dir: PathBuf) -> Result<String, Failure> {
    let manifest_path = dir.join("manifest.json");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("{}: {e}", manifest_path.display()))?,
    )?;
    let module = manifest["modules"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == MODULE))
        .ok_or("the manifest has no conv module")?;
    let entry = module["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == ENTRY))
        .ok_or("the manifest has no conv_im2col entry")?;
    let ptx_file = dir.join(module["file"].as_str().ok_or("module without a file")?);
    let ptx =
        std::fs::read_to_string(&ptx_file).map_err(|e| format!("{}: {e}", ptx_file.display()))?;

    let fields = conv_fields();
    let g = |k: &str| fields[k] as usize;
    let x_len = g("n") * g("c") * g("h") * g("w");
    let col_len = g("c") * g("r") * g("s") * g("n") * g("out_h") * g("out_w");
    // A fixed, exactly representable pattern: every element distinct.
    let x: Vec<f32> = (0..x_len).map(|i| i as f32 * 0.25 - 7.0).collect();

    let ctx = CudaContext::new(0)?;
    let (major, minor) = ctx.compute_capability()?;
    let need = module["min_compute_capability"]
        .as_array()
        .ok_or("no min_compute_capability")?;
    let need = (
        need[0].as_i64().unwrap_or(99) as i32,
        need[1].as_i64().unwrap_or(0) as i32,
    );
    if (major, minor) < need {
        return Err(format!(
            "device {major}.{minor} is older than the module's {}.{}",
            need.0, need.1
        )
        .into());
    }
    let stream = ctx.default_stream();
    let cu_module = ctx.load_module(Ptx::from_src(ptx))?;
    let function = cu_module.load_function(ENTRY)?;
    let x_dev = stream.clone_htod(&x)?;
    // Poisoned: an element the kernel does not write stays NaN.
    let mut col_dev = stream.clone_htod(&vec![f32::NAN; col_len])?;

    // Every argument as bytes, in the manifest's order, in 8-byte-aligned
    // storage; cuLaunchKernel gets a pointer to each.
    let mut args: Vec<Vec<u64>> = Vec::new();
    {
        let (x_ptr, _x_sync) = x_dev.device_ptr(&stream);
        let (col_ptr, _col_sync) = col_dev.device_ptr_mut(&stream);
        for p in entry["params"].as_array().ok_or("entry without params")? {
            let name = p["name"].as_str().ok_or("parameter without a name")?;
            let size = p["size"].as_u64().ok_or("parameter without a size")? as usize;
            let bytes: Vec<u8> = match (p["kind"].as_str(), name) {
                (Some("struct"), _) => {
                    let st = p["struct"]
                        .as_str()
                        .ok_or("struct parameter without its struct")?;
                    pack_struct(&manifest["structs"][st], &fields)?
                }
                (Some("pointer"), "x") => x_ptr.to_le_bytes().to_vec(),
                (Some("pointer"), "col") => col_ptr.to_le_bytes().to_vec(),
                _ => return Err(format!("{ENTRY}: no argument for parameter {name}").into()),
            };
            if bytes.len() != size {
                return Err(format!(
                    "{name}: {} bytes packed, the manifest says {size}",
                    bytes.len()
                )
                .into());
            }
            let mut slot = vec![0u64; size.div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut slot)[..size].copy_from_slice(&bytes);
            args.push(slot);
        }
        let mut params: Vec<*mut c_void> = args
            .iter_mut()
            .map(|a| a.as_mut_ptr() as *mut c_void)
            .collect();
        // The manifest's launch rule: "One thread per element of col
        // (grid-stride)", so any grid covers it; a small one makes it stride.
        let max_block = entry["max_threads_per_block"][0].as_u64().unwrap_or(1024) as u32;
        let block = 128.min(max_block);
        let grid = (col_len as u32).div_ceil(block).min(3);
        // SAFETY: params holds one pointer per parameter of the entry, each
        // to storage of the manifest's size for it (checked above), alive
        // until the launch returns; x and col hold x_len and col_len floats,
        // the sizes im2col reads and writes for this Conv2d.
        unsafe {
            result::launch_kernel(
                function.cu_function(),
                (grid, 1, 1),
                (block, 1, 1),
                0,
                stream.cu_stream(),
                &mut params,
            )?;
        }
    }
    stream.synchronize()?;
    let got = stream.clone_dtoh(&col_dev)?;
    let want = cpu_im2col(&fields, &x);
    let bad: Vec<usize> = (0..col_len)
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        return Err(format!(
            "{} of {col_len} elements differ from the CPU im2col; first at {i}: {} (GPU) vs {} (CPU)",
            bad.len(),
            got[i],
            want[i]
        )
        .into());
    }
    let params = entry["params"].as_array().map_or(0, Vec::len);
    Ok(format!(
        "gpu_manifest_launch: {ENTRY} from {} + manifest.json ({params} parameters, Conv2d packed from the \
         manifest's layout) on device {major}.{minor}: {col_len} elements bit-identical to the CPU im2col",
        module["file"].as_str().unwrap_or("?")
    ))
}

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/ptx")));
    // SAFETY: only tries to load the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!(
            "gpu_manifest_launch: needs a CUDA device, and no CUDA driver (libcuda.so.1) could be \
             loaded (on a machine without a GPU, run it on the emulated device: ci/gpu-emu)"
        );
        return ExitCode::from(2);
    }
    match run(dir) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpu_manifest_launch: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}
