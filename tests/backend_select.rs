//! Backend selection on a machine without a GPU (this one; CI): `Auto`
//! falls back to the CPU, an explicit CUDA device is an error naming what
//! is missing. On a machine with a driver the same calls must agree with
//! what the driver reports.
use kestrel::backend::{AnyBackend, DeviceChoice, select};

#[test]
fn auto_falls_back_to_the_cpu_without_a_driver() {
    let any = select(DeviceChoice::Auto).expect("Auto never fails");
    let usable = kestrel::cuda::device_count().unwrap_or(0) > 0;
    if !kestrel::cuda::driver_present() || !usable {
        assert!(matches!(any, AnyBackend::Cpu(_)), "got {}", any.name());
        assert_eq!(any.name(), "cpu");
    }
    // Either way the generic dispatch runs.
    let name = kestrel::with_backend!(any, b => kestrel::backend::Backend::name(&b));
    assert!(!name.is_empty());
}

#[test]
fn explicit_cpu_is_the_cpu() {
    assert!(matches!(
        select(DeviceChoice::Cpu).unwrap(),
        AnyBackend::Cpu(_)
    ));
}

#[test]
fn explicit_cuda_without_a_driver_is_an_error() {
    if kestrel::cuda::driver_present() {
        // A GPU machine: a device far beyond any real count must fail.
        let e = select(DeviceChoice::Cuda(4096)).unwrap_err().to_string();
        assert!(e.contains("4096"), "{e}");
        return;
    }
    let e = select(DeviceChoice::Cuda(0)).unwrap_err().to_string();
    assert!(
        e.contains("driver"),
        "error does not name the missing driver: {e}"
    );
    assert!(e.contains("libcuda"), "{e}");
}

#[test]
fn device_choice_parses() {
    assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
    assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
    assert_eq!(
        "cuda".parse::<DeviceChoice>().unwrap(),
        DeviceChoice::Cuda(0)
    );
    assert_eq!(
        "cuda:3".parse::<DeviceChoice>().unwrap(),
        DeviceChoice::Cuda(3)
    );
    let e = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
    assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
}
