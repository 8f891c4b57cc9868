//! CUDA streams and device memory, as much as the NCCL backend and its
//! benchmark need, through the driver API (cudarc, loaded at run time).

use std::ffi::c_void;

use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::sys as nc;

use super::probe::{self, driver_error};

/// A CUDA stream handle (the driver's `CUstream` and the runtime's
/// `cudaStream_t` are the same pointer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream(pub *mut c_void);

// SAFETY: a stream handle is a plain identifier, usable from any thread.
unsafe impl Send for Stream {}

impl Stream {
    /// The legacy default stream: libtorch's current stream unless a program
    /// sets another, and ordered with every other blocking stream.
    pub const DEFAULT: Stream = Stream(std::ptr::null_mut());

    pub(crate) fn nccl(self) -> nc::cudaStream_t {
        self.0.cast()
    }

    pub(crate) fn driver(self) -> cusys::CUstream {
        self.0.cast()
    }
}

/// Makes `device`'s primary context (the one libtorch and the CUDA runtime
/// use) current on this thread and returns it.
pub(super) fn primary_context(device: usize) -> Result<cusys::CUcontext, String> {
    let dev = cu::device::get(device as i32).map_err(driver_error)?;
    // SAFETY: `dev` is a valid device; the retained context is kept for the
    // life of the process (libtorch holds it too).
    let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(driver_error)?;
    // SAFETY: a context just retained.
    unsafe { cu::ctx::set_current(ctx) }.map_err(driver_error)?;
    Ok(ctx)
}

/// Device memory on one CUDA device, freed on drop.
pub struct DeviceBuffer {
    ptr: cusys::CUdeviceptr,
    bytes: usize,
    ctx: cusys::CUcontext,
}

// SAFETY: device memory and context handles may be used from any thread;
// every method makes the context current first.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// `bytes` bytes (at least 1) of uninitialised memory on `device`.
    pub fn new(device: usize, bytes: usize) -> Result<DeviceBuffer, String> {
        probe::cuda_driver()?;
        let ctx = primary_context(device)?;
        // SAFETY: a plain allocation in the context just made current.
        let ptr = unsafe {
            cu::malloc_sync(bytes.max(1)).map_err(|e| {
                format!(
                    "allocating {bytes} bytes on CUDA device {device}: {}",
                    driver_error(e)
                )
            })?
        };
        Ok(DeviceBuffer { ptr, bytes, ctx })
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Copies `src` (at most `len()` bytes) to the start of the buffer; waits.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), String> {
        assert!(
            src.len() <= self.bytes,
            "copy of {} bytes into {}",
            src.len(),
            self.bytes
        );
        // SAFETY: `src` fits in the allocation; the copy is synchronous.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(driver_error)?;
            cu::memcpy_htod_sync(self.ptr, src).map_err(driver_error)
        }
    }

    /// Copies the start of the buffer into `dst` (at most `len()` bytes);
    /// waits for the default stream's earlier work first.
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<(), String> {
        assert!(
            dst.len() <= self.bytes,
            "copy of {} bytes out of {}",
            dst.len(),
            self.bytes
        );
        // SAFETY: `dst` fits in the allocation; the copy is synchronous.
        unsafe {
            cu::ctx::set_current(self.ctx).map_err(driver_error)?;
            cu::memcpy_dtoh_sync(dst, self.ptr).map_err(driver_error)
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: memory this buffer allocated, freed once.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx);
            let _ = cu::free_sync(self.ptr);
        }
    }
}
