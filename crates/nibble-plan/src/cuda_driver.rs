//! The CUDA driver API, loaded at run time (`libcuda.so.1` / `nvcuda.dll`), only for what the
//! planner needs: device count, names, memory and compute capability.

use crate::inventory::{CudaDevice, CudaStatus};

#[cfg(not(feature = "cuda"))]
pub(crate) fn query() -> (Vec<CudaDevice>, CudaStatus) {
    (Vec::new(), CudaStatus::NotCompiled)
}

#[cfg(feature = "cuda")]
pub(crate) fn query() -> (Vec<CudaDevice>, CudaStatus) {
    match unsafe { driver::query() } {
        Ok((devices, version)) => (devices, CudaStatus::Available { driver_version: version }),
        Err(reason) => (Vec::new(), CudaStatus::NoDriver { reason }),
    }
}

#[cfg(feature = "cuda")]
mod driver {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

    use libloading::{Library, Symbol};

    use super::CudaDevice;

    type CuResult = c_int;
    type CuDevice = c_int;
    type CuContext = *mut c_void;
    const ATTR_CC_MAJOR: c_int = 75;
    const ATTR_CC_MINOR: c_int = 76;

    fn check(what: &str, r: CuResult) -> Result<(), String> {
        if r == 0 {
            Ok(())
        } else {
            Err(format!("{what} failed with CUDA error {r}"))
        }
    }

    unsafe fn sym<'a, T>(lib: &'a Library, name: &[u8]) -> Result<Symbol<'a, T>, String> {
        lib.get(name).map_err(|e| format!("the CUDA driver lacks {}: {e}", String::from_utf8_lossy(name)))
    }

    fn open() -> Result<Library, String> {
        let names: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };
        let mut last = String::new();
        for n in names {
            // SAFETY: loading the system's CUDA driver runs its initializers, which is what using CUDA means.
            match unsafe { Library::new(n) } {
                Ok(l) => return Ok(l),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("no CUDA driver library found ({last}); install the NVIDIA driver"))
    }

    /// SAFETY: calls the CUDA driver API with the signatures it documents.
    pub(super) unsafe fn query() -> Result<(Vec<CudaDevice>, u32), String> {
        let lib = open()?;
        let cu_init: Symbol<unsafe extern "C" fn(c_uint) -> CuResult> = sym(&lib, b"cuInit\0")?;
        let version_fn: Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> = sym(&lib, b"cuDriverGetVersion\0")?;
        let count_fn: Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> = sym(&lib, b"cuDeviceGetCount\0")?;
        let get_fn: Symbol<unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult> = sym(&lib, b"cuDeviceGet\0")?;
        let name_fn: Symbol<unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult> =
            sym(&lib, b"cuDeviceGetName\0")?;
        let total_fn: Symbol<unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult> =
            sym(&lib, b"cuDeviceTotalMem_v2\0")?;
        let attr_fn: Symbol<unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult> =
            sym(&lib, b"cuDeviceGetAttribute\0")?;
        let retain_fn: Symbol<unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult> =
            sym(&lib, b"cuDevicePrimaryCtxRetain\0")?;
        let release_fn: Symbol<unsafe extern "C" fn(CuDevice) -> CuResult> =
            sym(&lib, b"cuDevicePrimaryCtxRelease_v2\0")?;
        let push_fn: Symbol<unsafe extern "C" fn(CuContext) -> CuResult> = sym(&lib, b"cuCtxPushCurrent_v2\0")?;
        let pop_fn: Symbol<unsafe extern "C" fn(*mut CuContext) -> CuResult> = sym(&lib, b"cuCtxPopCurrent_v2\0")?;
        let meminfo_fn: Symbol<unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult> =
            sym(&lib, b"cuMemGetInfo_v2\0")?;

        check("cuInit", cu_init(0))?;
        let mut version: c_int = 0;
        check("cuDriverGetVersion", version_fn(&mut version))?;
        let mut count: c_int = 0;
        check("cuDeviceGetCount", count_fn(&mut count))?;
        let mut devices = Vec::new();
        for ordinal in 0..count {
            let mut dev: CuDevice = 0;
            check("cuDeviceGet", get_fn(&mut dev, ordinal))?;
            let mut name = [0 as c_char; 256];
            check("cuDeviceGetName", name_fn(name.as_mut_ptr(), 255, dev))?;
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            let mut total: usize = 0;
            check("cuDeviceTotalMem", total_fn(&mut total, dev))?;
            let (mut major, mut minor): (c_int, c_int) = (0, 0);
            check("cuDeviceGetAttribute", attr_fn(&mut major, ATTR_CC_MAJOR, dev))?;
            check("cuDeviceGetAttribute", attr_fn(&mut minor, ATTR_CC_MINOR, dev))?;
            // Free memory needs a context; the primary one is what candle will use anyway.
            let mut ctx: CuContext = std::ptr::null_mut();
            check("cuDevicePrimaryCtxRetain", retain_fn(&mut ctx, dev))?;
            let (mut free, mut total2): (usize, usize) = (0, 0);
            let pushed = push_fn(ctx);
            let info = if pushed == 0 { meminfo_fn(&mut free, &mut total2) } else { pushed };
            if pushed == 0 {
                let mut popped: CuContext = std::ptr::null_mut();
                let _ = pop_fn(&mut popped);
            }
            let _ = release_fn(dev);
            check("cuMemGetInfo", info)?;
            devices.push(CudaDevice {
                ordinal: ordinal as usize,
                name,
                total_bytes: total as u64,
                free_bytes: free as u64,
                compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            });
        }
        Ok((devices, version.max(0) as u32))
    }
}
