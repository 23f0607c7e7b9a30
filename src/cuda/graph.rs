//! Captured launch sequences (CUDA graphs): a run of `ops::*::cuda` calls
//! recorded once through cudarc's stream capture and replayed with one
//! `cuGraphLaunch`, which saves the per-launch driver overhead that bounds
//! short training steps.
//!
//! A graph replays the recorded launches with the arguments they had at
//! capture: the same buffers, the same by-value parameters. So whatever
//! changes between replays must live in device memory the graph reads (a
//! batch uploaded into a fixed buffer before the replay, for instance), and
//! nothing inside the captured closure may allocate, free, copy from
//! pageable host memory or synchronize: CUDA refuses those during a capture
//! (the closure's error, or the invalidated capture, comes back as an
//! [`Error::Cuda`]).

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::CudaBackend;
use crate::error::{Error, Result};

/// A recorded launch sequence on one [`CudaBackend`]'s stream; replay it
/// with [`CudaBackend::replay`].
pub struct CapturedGraph {
    graph: CudaGraph,
}

impl std::fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedGraph").finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Records what `f` enqueues on this handle's stream, without running
    /// it, into a graph. Thread-local capture mode: a "potentially unsafe"
    /// driver call from this thread during the capture (a synchronous
    /// allocation or copy) fails and invalidates it, so a closure that
    /// allocates is found here rather than replayed wrongly. When `f`
    /// fails, the capture is ended and discarded and `f`'s error returned.
    pub fn capture(&self, f: impl FnOnce(&CudaBackend) -> Result<()>) -> Result<CapturedGraph> {
        self.begin_capture()?;
        let r = f(self);
        // End the capture whatever `f` did, so the stream is usable again.
        let ended = self.end_capture();
        r?;
        ended
    }

    /// Starts recording this handle's stream (thread-local mode, as
    /// [`CudaBackend::capture`]); for callers whose recorded work cannot sit
    /// in one closure (the training loop's step borrows the model).
    /// Every `begin_capture` must be followed by [`CudaBackend::end_capture`],
    /// also when the work in between failed, or the stream stays capturing.
    pub fn begin_capture(&self) -> Result<()> {
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| self.error("cuStreamBeginCapture", e))
    }

    /// Ends the recording [`CudaBackend::begin_capture`] started and
    /// instantiates its graph (an error if the capture was invalidated by an
    /// illegal call in between, or recorded nothing).
    pub fn end_capture(&self) -> Result<CapturedGraph> {
        let ended = self.stream().end_capture(CUgraphInstantiate_flags(0));
        match ended.map_err(|e| self.error("cuStreamEndCapture", e))? {
            Some(graph) => Ok(CapturedGraph { graph }),
            None => Err(self.error(
                "cuStreamEndCapture",
                Error::invalid("capture", "graph", "the capture recorded no graph"),
            )),
        }
    }

    /// The number of nodes (launches, copies, memsets) `g` holds: what one
    /// replay saves in per-launch host overhead.
    pub fn graph_nodes(&self, g: &CapturedGraph) -> Result<usize> {
        let mut count = 0usize;
        // SAFETY: a live graph (owned by `g`), no node array: the driver
        // only writes the count.
        let r = unsafe {
            cudarc::driver::sys::cuGraphGetNodes(
                g.graph.cu_graph(),
                std::ptr::null_mut(),
                &mut count,
            )
        };
        r.result().map_err(|e| self.error("cuGraphGetNodes", e))?;
        Ok(count)
    }

    /// Enqueues one replay of `g` on this handle's stream (returns without
    /// waiting, like the launches it replays).
    pub fn replay(&self, g: &CapturedGraph) -> Result<()> {
        g.graph.launch().map_err(|e| self.error("cuGraphLaunch", e))
    }
}
