//! Staged host-to-device uploads: the per-step batch upload taken off the
//! compute stream's critical path.
//!
//! A plain `cuMemcpyHtoDAsync` from pageable memory on the compute stream
//! sits in stream order between the previous step's work and this step's,
//! and the driver first copies the pageable bytes into its own page-locked
//! staging (waiting for that staging to be free). [`StagedUploader`] keeps a
//! ring of slots, each a page-locked host buffer and a device landing
//! buffer, and uploads in three stages:
//!
//! 1. host: wait until the slot's previous host-to-device copy has completed
//!    (event `uploaded`, long done in the steady state), then let the caller
//!    write the data straight into the page-locked buffer (the batch gather:
//!    no other host copy);
//! 2. copy stream: wait for event `consumed` (the compute stream has copied
//!    the slot's landing buffer out), copy host -> landing, record
//!    `uploaded`;
//! 3. compute stream: wait for `uploaded`, copy landing -> destination
//!    device-to-device (fast, on the device), record `consumed`.
//!
//! So the host-to-device DMA of batch t+1 runs on the copy stream while the
//! compute stream runs step t, and the host waits for the device only when
//! it is a whole ring ahead. The destination is written in the compute
//! stream's order, as a plain upload writes it: work already enqueued that
//! reads it is not disturbed.
//!
//! Growing a slot (a larger upload than it has held) waits for both of its
//! events before freeing the old buffers. Nothing of this may be recorded
//! into a CUDA graph (a replay would repeat the copies from whatever the
//! slots hold then): an upload while the compute stream is capturing is an
//! error.

use std::sync::Arc;

use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    PinnedHostSlice,
};

use super::CudaBackend;
use crate::error::{Error, Result};

/// Slots in the ring: two steps' worth of a step's two uploads (inputs and
/// labels), so that the host can enqueue a step ahead of the device without
/// waiting.
pub const STAGE_SLOTS: usize = 4;

/// One slot of the ring: page-locked host bytes and device landing bytes
/// of the same capacity, and the events that order their reuse.
struct Slot {
    /// Page-locked host bytes (`None` until first used).
    host: Option<PinnedHostSlice<u8>>,
    /// Device landing bytes, as many as `host` holds.
    landing: Option<CudaSlice<u8>>,
    /// Recorded on the copy stream after the slot's last host-to-device copy.
    uploaded: CudaEvent,
    /// Recorded on the compute stream after the landing buffer was last
    /// allocated or copied out.
    consumed: CudaEvent,
    /// Whether `uploaded` has been recorded.
    used: bool,
}

impl Slot {
    fn capacity(&self) -> usize {
        self.host.as_ref().map_or(0, |h| h.len())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The DMA must not read freed host memory, nor the compute stream a
        // freed landing buffer; errors cannot be reported from a drop, and
        // a failed wait means the context is gone with the memory.
        if self.used {
            let _ = self.uploaded.synchronize();
        }
        let _ = self.consumed.synchronize();
    }
}

/// A ring of staged upload slots on its own copy stream (see the module
/// docs). One per [`CudaBackend`] stream that uploads through it.
pub struct StagedUploader {
    // Before `copy`: a slot's drop waits for its copies first.
    slots: Vec<Slot>,
    copy: Arc<CudaStream>,
    next: usize,
    uploads: u64,
}

impl std::fmt::Debug for StagedUploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedUploader")
            .field("slots", &self.slots.len())
            .field(
                "capacities",
                &self.slots.iter().map(Slot::capacity).collect::<Vec<_>>(),
            )
            .field("uploads", &self.uploads)
            .finish()
    }
}

impl StagedUploader {
    /// A ring of [`STAGE_SLOTS`] empty slots and a copy stream on `gpu`'s
    /// context (buffers are allocated on first use).
    pub fn new(gpu: &CudaBackend) -> Result<Self> {
        let ctx = gpu.context();
        let copy = ctx
            .new_stream()
            .map_err(|e| gpu.error("cuStreamCreate", e))?;
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| gpu.error("cuEventCreate", e))
        };
        let mut slots = Vec::with_capacity(STAGE_SLOTS);
        for _ in 0..STAGE_SLOTS {
            slots.push(Slot {
                host: None,
                landing: None,
                uploaded: event()?,
                consumed: event()?,
                used: false,
            });
        }
        Ok(StagedUploader {
            copy,
            slots,
            next: 0,
            uploads: 0,
        })
    }

    /// Uploads done so far.
    pub fn uploads(&self) -> u64 {
        self.uploads
    }

    /// The slots' capacities in bytes (0: not allocated yet).
    pub fn capacities(&self) -> Vec<usize> {
        self.slots.iter().map(Slot::capacity).collect()
    }

    /// Writes `dst` (on `gpu`'s stream, in its order) with what `fill`
    /// puts into a page-locked buffer of `dst.len()` elements: see the
    /// module docs. `op` names the caller in errors. `fill`'s error is
    /// returned as is, with nothing enqueued. An error, before anything is
    /// done, while `gpu`'s stream is capturing a graph.
    pub fn upload<T: DeviceRepr + bytemuck::Pod>(
        &mut self,
        gpu: &CudaBackend,
        op: &'static str,
        dst: &mut CudaViewMut<'_, T>,
        fill: impl FnOnce(&mut [T]) -> Result<()>,
    ) -> Result<()> {
        let compute = gpu.stream();
        let status = compute
            .capture_status()
            .map_err(|e| gpu.error("cuStreamIsCapturing", e))?;
        if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Err(Error::invalid(
                op,
                "stream",
                "a staged upload while the stream is capturing a CUDA graph: the graph would \
                 replay the copies from whatever the staging slots hold then; upload before \
                 the capture begins",
            ));
        }
        let bytes = dst.len() * std::mem::size_of::<T>();
        if bytes == 0 {
            return fill(&mut []);
        }
        let idx = self.next;
        let slot = &mut self.slots[idx];

        // 1. The slot's previous copy has read its host bytes.
        if slot.used {
            slot.uploaded
                .synchronize()
                .map_err(|e| gpu.error("cuEventSynchronize", e))?;
        }
        if slot.capacity() < bytes {
            // The compute stream has copied the old landing buffer out too.
            slot.consumed
                .synchronize()
                .map_err(|e| gpu.error("cuEventSynchronize", e))?;
            slot.host = None;
            slot.landing = None;
            // SAFETY: the bytes are written by `fill` below before the copy
            // reads them (only the first `bytes` are ever copied).
            let host = unsafe { gpu.context().alloc_pinned::<u8>(bytes) }
                .map_err(|e| gpu.error("cuMemHostAlloc", e))?;
            slot.host = Some(host);
            slot.landing = Some(gpu.zeros::<u8>(bytes)?);
            // The landing buffer is allocated (and zeroed) in the compute
            // stream's order: the copy stream's wait on `consumed` below
            // then orders the first copy after it.
            slot.consumed
                .record(compute)
                .map_err(|e| gpu.error("cuEventRecord", e))?;
        }
        let host = slot.host.as_mut().expect("allocated above");
        let landing = slot.landing.as_mut().expect("allocated above");
        {
            // cudarc's own event of the slice is never recorded (kestrel
            // orders the slot with `uploaded`), so this does not wait.
            let all = host
                .as_mut_slice()
                .map_err(|e| gpu.error("cuEventSynchronize", e))?;
            let typed: &mut [T] = bytemuck::try_cast_slice_mut(&mut all[..bytes]).map_err(|e| {
                Error::invalid(
                    op,
                    "staging",
                    format!("page-locked buffer not aligned for the element type: {e}"),
                )
            })?;
            fill(typed)?;
        }
        self.next = (idx + 1) % STAGE_SLOTS;

        // 2. host -> landing on the copy stream, after the compute stream
        // has copied the landing buffer's previous contents out.
        self.copy
            .wait(&slot.consumed)
            .map_err(|e| gpu.error("cuStreamWaitEvent", e))?;
        {
            let all = host
                .as_mut_slice()
                .map_err(|e| gpu.error("cuEventSynchronize", e))?;
            let (land, _guard) = landing.device_ptr_mut(&self.copy);
            // SAFETY: `land` holds at least `bytes` bytes (the slot's
            // capacity), `all[..bytes]` is page-locked memory that stays
            // allocated and unwritten until `uploaded` completes (step 1 of
            // the slot's next use, growth and drop all wait for it).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    land,
                    &all[..bytes],
                    self.copy.cu_stream(),
                )
            }
            .map_err(|e| gpu.error("cuMemcpyHtoDAsync", e))?;
        }
        slot.uploaded
            .record(&self.copy)
            .map_err(|e| gpu.error("cuEventRecord", e))?;
        slot.used = true;

        // 3. landing -> destination on the compute stream.
        compute
            .wait(&slot.uploaded)
            .map_err(|e| gpu.error("cuStreamWaitEvent", e))?;
        {
            let (src, _g1) = landing.device_ptr(compute);
            let (dstp, _g2) = dst.device_ptr_mut(compute);
            // SAFETY: both ranges hold `bytes` bytes (dst has dst.len()
            // elements of T; the landing buffer at least `bytes`) and do
            // not overlap (the landing buffer is the slot's own).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dstp, src, bytes, compute.cu_stream())
            }
            .map_err(|e| gpu.error("cuMemcpyDtoDAsync", e))?;
        }
        slot.consumed
            .record(compute)
            .map_err(|e| gpu.error("cuEventRecord", e))?;
        self.uploads += 1;
        Ok(())
    }
}
