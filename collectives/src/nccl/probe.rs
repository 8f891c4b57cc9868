//! What the NCCL backend needs, checked without risking a panic.
//!
//! cudarc's run-time loader panics when a library is missing, so each library
//! is first opened here with `dlopen`, by a name cudarc's loader also tries
//! and found the same way (`LD_LIBRARY_PATH`, the binary's rpath, the
//! system's cache); only then is cudarc called. Results are cached: the
//! libraries stay loaded for the life of the process.
//!
//! - [`nccl_library`]: `libnccl.so` loads and answers `ncclGetVersion` (no GPU
//!   needed; `make setup` links `libnccl.so` to the torch wheel's
//!   `libnccl.so.2`).
//! - [`cuda_driver`]: the NVIDIA driver's `libcuda.so.1` loads, `cuInit`
//!   succeeds and at least one device is visible.
//! - [`probe`]: both, i.e. the nccl backend can run.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

use cudarc::driver::{result as cu, sys as cusys};

/// NCCL as loaded in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclLibrary {
    /// `major.minor.patch`.
    pub version: String,
    /// NCCL's version code (major·10000 + minor·100 + patch).
    pub code: i32,
    /// The file the library was loaded from, when the loader says.
    pub path: Option<PathBuf>,
}

/// The CUDA driver as seen by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDriver {
    /// The CUDA version the driver supports, as `major.minor`.
    pub version: String,
    /// Visible CUDA devices (at least 1).
    pub devices: usize,
}

/// Everything the nccl backend needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclReady {
    pub nccl: NcclLibrary,
    pub driver: CudaDriver,
}

/// Loads NCCL and reads its version; the error says what is missing.
pub fn nccl_library() -> Result<NcclLibrary, String> {
    static CACHE: OnceLock<Result<NcclLibrary, String>> = OnceLock::new();
    CACHE.get_or_init(load_nccl).clone()
}

/// Loads and initialises the CUDA driver and counts its devices.
pub fn cuda_driver() -> Result<CudaDriver, String> {
    static CACHE: OnceLock<Result<CudaDriver, String>> = OnceLock::new();
    CACHE.get_or_init(load_driver).clone()
}

/// Whether the nccl backend can run here: a CUDA driver with a device, and
/// NCCL. The driver is checked first (its absence is the common case).
pub fn probe() -> Result<NcclReady, String> {
    let driver = cuda_driver()?;
    let nccl = nccl_library()?;
    Ok(NcclReady { nccl, driver })
}

fn load_nccl() -> Result<NcclLibrary, String> {
    // cudarc's loader tries "libnccl.so" first.
    let handle = dlopen_first(&["libnccl.so"]).map_err(|e| {
        format!(
            "NCCL does not load ({e}); `make setup` links libnccl.so to the torch wheel's \
             libnccl.so.2, elsewhere put NCCL's lib directory on LD_LIBRARY_PATH"
        )
    })?;
    // SAFETY: a valid handle and a NUL-terminated symbol name.
    let sym = unsafe { libc::dlsym(handle, c"ncclGetVersion".as_ptr()) };
    if sym.is_null() {
        return Err(format!("libnccl.so has no ncclGetVersion: {}", dl_error()));
    }
    // SAFETY: ncclGetVersion has this C signature in every NCCL release.
    let get_version: extern "C" fn(*mut c_int) -> c_int = unsafe { std::mem::transmute(sym) };
    let mut code: c_int = 0;
    let rc = get_version(&mut code);
    if rc != 0 {
        return Err(format!("ncclGetVersion failed with code {rc}"));
    }
    Ok(NcclLibrary {
        version: format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100),
        code,
        path: library_path_of(sym),
    })
}

fn load_driver() -> Result<CudaDriver, String> {
    // cudarc's loader tries these names too ("libcuda.so" first, ".1" last).
    dlopen_first(&["libcuda.so.1", "libcuda.so"]).map_err(|e| {
        format!(
            "no CUDA driver: libcuda.so.1 does not load ({e}); CUDA needs an NVIDIA GPU and its driver"
        )
    })?;
    cu::init().map_err(|e| format!("the CUDA driver failed to initialise: {}", driver_error(e)))?;
    let devices = cu::device::get_count()
        .map_err(|e| format!("counting CUDA devices failed: {}", driver_error(e)))?;
    if devices < 1 {
        return Err(
            "the CUDA driver sees no device (check nvidia-smi and CUDA_VISIBLE_DEVICES)".into(),
        );
    }
    let mut v: c_int = 0;
    // SAFETY: a valid out-pointer; the driver is initialised.
    unsafe { cusys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| {
            format!(
                "reading the CUDA driver version failed: {}",
                driver_error(e)
            )
        })?;
    Ok(CudaDriver {
        version: format!("{}.{}", v / 1000, (v % 1000) / 10),
        devices: devices as usize,
    })
}

/// `NAME (DESCRIPTION)` of a driver error.
pub(crate) fn driver_error(e: cu::DriverError) -> String {
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("CUresult {}", e.0 as i32));
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Opens the first of `names` that loads; the handle stays open for the
/// life of the process. The error is the loader's message for the first name.
fn dlopen_first(names: &[&str]) -> Result<*mut c_void, String> {
    let mut first_error = None;
    for name in names {
        let cname = CString::new(*name).expect("no NUL in a library name");
        // SAFETY: a valid C string; the handle is never closed.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            return Ok(handle);
        }
        first_error.get_or_insert_with(dl_error);
    }
    Err(first_error.unwrap_or_else(|| "no library name given".into()))
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a valid C string owned by libc.
    unsafe {
        let e: *const c_char = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn library_path_of(sym: *mut c_void) -> Option<PathBuf> {
    // SAFETY: Dl_info is plain data; zeroed is a valid empty value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `sym` is an address inside a loaded library; dladdr fills `info`.
    let found = unsafe { libc::dladdr(sym, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a valid C string owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    std::fs::canonicalize(name.to_string_lossy().as_ref()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On any machine the probes answer, never panic; where there is no
    /// driver (CI) the answer says so and what NCCL needs.
    #[test]
    fn probes_answer_without_panicking() {
        match cuda_driver() {
            Ok(d) => assert!(d.devices >= 1, "{d:?}"),
            Err(why) => assert!(
                why.contains("CUDA driver") || why.contains("no device"),
                "{why}"
            ),
        }
        match nccl_library() {
            Ok(n) => {
                assert!(n.code >= 20000, "{n:?}");
                assert!(n.version.starts_with("2."), "{n:?}");
            }
            Err(why) => assert!(why.contains("NCCL does not load"), "{why}"),
        }
        // Asking twice gives the same answer (cached, libraries stay loaded).
        assert_eq!(probe(), probe());
    }

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let err = dlopen_first(&["libcohort-no-such-library.so"]).unwrap_err();
        assert!(err.contains("libcohort-no-such-library.so"), "{err}");
    }
}
