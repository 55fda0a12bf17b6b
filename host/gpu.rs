//! The CUDA backend: one context and stream, the embedded PTX modules (portable and Hopper,
//! one loaded), the kernel entry table, and the two functions that launch a kernel (plainly,
//! and chained after the previous one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::Pod;
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use kvc_abi::params::compress::RADIX_PASSES;
use kvc_abi::params::{AggregateParams, AppendParams, CompressParams, DecodeParams};
use kvc_abi::plan::{DeviceProps, KernelProps, LaunchDims};
use kvc_abi::DType;

use crate::error::{Error, Result};

/// The kernels as portable PTX (`sm_80`: Ampere and later), built from `kernels-gpu/` by
/// `build.rs` (or its committed copy).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kvc.ptx"));

/// The same kernels for Hopper (`sm_90a`, compute capability 9.0 only), with its
/// instructions turned on (`cfg(kvc_hopper)` in `kernels-gpu/`).
pub const PTX_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/kvc_sm90a.ptx"));

/// `fresh` when `build.rs` compiled the PTX with the pinned nightly, `committed` when it fell
/// back to the copies in `kernels-gpu/ptx/`.
pub const PTX_SOURCE: &str = env!("KVC_PTX_SOURCE");

/// Set to any value, makes [`Gpu::new`] load the portable module on a Hopper GPU too (to test
/// or compare it there).
pub const PORTABLE_PTX_VAR: &str = "KVC_PORTABLE_PTX";

/// Head dimensions with kernel instantiations.
pub const HEAD_DIMS: [u32; 3] = [64, 128, 256];
/// Group sizes (query heads per KV head) with kernel instantiations.
pub const GROUP_SIZES: [u32; 4] = [1, 2, 4, 8];
/// Block sizes the cache accepts (powers of two of at least `MIN_BLOCK_SIZE`; these are tested).
pub const BLOCK_SIZES: [u32; 3] = [8, 16, 32];
// The warp-specialized pass 1 brings whole blocks into its key tiles
// (`kvc_abi::plan::WS_TILE_KEYS`), one lane a block, and `B` positions by one bulk copy.
const _: () = {
    let mut i = 0;
    while i < BLOCK_SIZES.len() {
        let b = BLOCK_SIZES[i];
        assert!(kvc_abi::plan::WS_TILE_KEYS.is_multiple_of(b) && (b * 4).is_multiple_of(16));
        i += 1;
    }
};
// The decode kernel sizes its block-id table by the smallest block size.
const _: () = assert!(BLOCK_SIZES[0] >= kvc_abi::plan::MIN_BLOCK_SIZE);

/// Entry point of the decode kernel for `dtype`, head dimension `head_dim` and group size `g`,
/// with metric recording (`record`) or without: separate kernels, so that the recording code
/// costs the plain decode no registers.
pub fn decode_entry(dtype: DType, head_dim: u32, group_size: u32, record: bool) -> String {
    let kind = if record { "rec_" } else { "" };
    format!(
        "paged_decode_{kind}{}_d{head_dim}_g{group_size}",
        dtype.name()
    )
}

/// Entry point of the decode merge kernel for `dtype`.
pub fn decode_merge_entry(dtype: DType) -> String {
    format!("paged_decode_merge_{}", dtype.name())
}

/// Entry point of window aggregation pass 1 for `dtype` and head dimension `head_dim`.
pub fn window_stats_entry(dtype: DType, head_dim: u32) -> String {
    format!("window_stats_{}_d{head_dim}", dtype.name())
}

/// Entry point of window aggregation pass 2 for `dtype` and head dimension `head_dim`.
pub fn window_scores_entry(dtype: DType, head_dim: u32) -> String {
    format!("window_scores_{}_d{head_dim}", dtype.name())
}

/// Entry point of the warp-specialized pass 2 for 16-bit `dtype` at `D = 128` (the Hopper
/// module, `agg_ws_scores`).
pub fn window_scores_ws_entry(dtype: DType) -> String {
    format!("window_scores_ws_{}_d128", dtype.name())
}

/// Entry point of the merge of pass 1's key splits (dtype-agnostic).
pub const WINDOW_STATS_MERGE_ENTRY: &str = "window_stats_merge";

/// Entry points of the compression step (dtype-agnostic: compaction copies bytes). The
/// histogram passes, each an entry of its own (so that no pass's code sets another's
/// registers): pass 0 reads the cache and writes the key digests, the others read those.
pub const SCHED_HIST_ENTRIES: [&str; RADIX_PASSES as usize] =
    ["sched_hist0", "sched_hist1", "sched_hist2", "sched_hist3"];
/// Copies the step's inputs from host-mapped memory and clears the schedule's state.
pub const SCHED_INIT_ENTRY: &str = "sched_init";
/// Per-group budget and threshold of the schedule.
pub const SCHED_BUDGET_ENTRY: &str = "sched_budget";
/// One radix digit of the schedule's threshold; after the last, blocks per head slot and the
/// ties.
pub const SCHED_DIGIT_ENTRY: &str = "sched_digit";
/// Per head slot selection and compaction, CTAs of `COMPACT_THREADS[0]`.
pub const COMPACT_ENTRY: &str = "compact";
/// The same in CTAs of `COMPACT_THREADS[1]`, for steps of many head slots
/// (`CompressPlan::compact_narrow`).
pub const COMPACT_NARROW_ENTRY: &str = "compact_narrow";

/// Entry point of `append_kv` (one for every dtype: it copies bytes).
pub const APPEND_ENTRY: &str = "append_kv";

/// A params struct with an echo kernel: the kernel writes the bytes it received to the
/// address in one of its fields (the ABI self-check of `tests/abi_roundtrip.rs`).
pub trait EchoParams: Pod {
    /// The echo kernel's entry point.
    const ECHO_ENTRY: &'static str;
    /// Points the field the echo kernel writes to at `addr`.
    fn set_echo_dst(&mut self, addr: u64);
}

impl EchoParams for DecodeParams {
    const ECHO_ENTRY: &'static str = "abi_echo_decode";
    fn set_echo_dst(&mut self, addr: u64) {
        self.out = addr;
    }
}

impl EchoParams for AggregateParams {
    const ECHO_ENTRY: &'static str = "abi_echo_aggregate";
    fn set_echo_dst(&mut self, addr: u64) {
        self.stats = addr;
    }
}

impl EchoParams for CompressParams {
    const ECHO_ENTRY: &'static str = "abi_echo_compress";
    fn set_echo_dst(&mut self, addr: u64) {
        self.heads = addr;
    }
}

impl EchoParams for AppendParams {
    const ECHO_ENTRY: &'static str = "abi_echo_append";
    fn set_echo_dst(&mut self, addr: u64) {
        self.meta = addr;
    }
}

/// Echo kernels of `tests/abi_roundtrip.rs`.
pub const ECHO_ENTRIES: [&str; 4] = [
    DecodeParams::ECHO_ENTRY,
    AppendParams::ECHO_ENTRY,
    AggregateParams::ECHO_ENTRY,
    CompressParams::ECHO_ENTRY,
];

/// Every entry point the host may launch from the portable module, or the Hopper module
/// (`hopper`, which adds the warp-specialized pass 2): the PTX must define exactly these.
pub fn entry_points(hopper: bool) -> Vec<String> {
    let mut names = Vec::new();
    for dtype in DType::ALL {
        for d in HEAD_DIMS {
            for g in GROUP_SIZES {
                names.push(decode_entry(dtype, d, g, false));
                names.push(decode_entry(dtype, d, g, true));
            }
        }
        names.push(decode_merge_entry(dtype));
        for d in HEAD_DIMS {
            names.push(window_stats_entry(dtype, d));
            names.push(window_scores_entry(dtype, d));
        }
        if hopper && dtype.elem_bytes() == 2 {
            names.push(window_scores_ws_entry(dtype));
        }
    }
    names.push(WINDOW_STATS_MERGE_ENTRY.to_string());
    for entry in SCHED_HIST_ENTRIES.into_iter().chain([
        SCHED_INIT_ENTRY,
        SCHED_BUDGET_ENTRY,
        SCHED_DIGIT_ENTRY,
        COMPACT_ENTRY,
        COMPACT_NARROW_ENTRY,
    ]) {
        names.push(entry.to_string());
    }
    names.push(APPEND_ENTRY.to_string());
    names.extend(ECHO_ENTRIES.iter().map(|s| s.to_string()));
    names
}

/// Bytes of the scratch buffer a new device starts with (decode partials, append metadata).
const INITIAL_WORKSPACE_BYTES: usize = 1 << 20;
/// Bytes of the pinned staging buffer a new device starts with (a timed compression step
/// reads back ~100 KB of move counts at 16 x 8192 tokens, Llama-3.1-8B).
const INITIAL_STAGING_BYTES: usize = 1 << 18;
/// Bytes of the host-mapped buffer a new device starts with (a compression step exchanges
/// ~33 KB at 16 x 8192 tokens, Llama-3.1-8B).
const INITIAL_HOST_IO_BYTES: usize = 1 << 16;
/// How often [`Gpu::poll`] asks the driver: a query on every spin slowed the compaction it
/// waited for by ~6 us at 16 x 8192 (H100, docs/PERF.md compression v22).
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_micros(2);
/// Timing events a device keeps for timed steps.
const TIMING_EVENTS: usize = 3;

/// Page-locked host memory, cached (not write-combined: the host reads it); with `mapped`,
/// also addressable by kernels.
fn pinned(ctx: &Arc<CudaContext>, bytes: usize, mapped: bool) -> Result<PinnedHostSlice<u8>> {
    let flags = if mapped {
        cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP
    } else {
        0
    };
    // SAFETY: the contents are unset; only bytes a copy or the host has written are read
    // (Readback, HostIo).
    unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, flags) }
        .map_err(Error::driver("allocating pinned host memory"))
}

/// A new event (timing enabled).
fn new_event(ctx: &Arc<CudaContext>) -> Result<CudaEvent> {
    ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(Error::driver("creating an event"))
}

/// Host-mapped memory, its host and device addresses, and an event after the launches that
/// use it.
struct Mapped {
    host: PinnedHostSlice<u8>,
    /// `host`'s start as words (pinned allocations are page-aligned), taken once: cudarc's
    /// accessors first wait on an event it records for its own copies (this memory is only
    /// used by kernels), a driver call per step before the first launch.
    words: *mut u32,
    device: u64,
    done: CudaEvent,
}

// SAFETY: `words` points into `host`, which `Mapped` owns and which may move between
// threads; the memory is only reached through `&mut Mapped` or `&Mapped` held by a `HostIo`.
unsafe impl Send for Mapped {}

impl Mapped {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        let mut host = pinned(ctx, bytes, true)?;
        let ptr = host
            .as_mut_ptr()
            .map_err(Error::driver("mapping host memory"))?;
        let mut device = 0;
        // SAFETY: `ptr` is the start of a live allocation made with DEVICEMAP in this context.
        unsafe { cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut device, ptr.cast(), 0) }
            .result()
            .map_err(Error::driver("mapping host memory"))?;
        let done = new_event(ctx)?;
        Ok(Self {
            host,
            words: ptr.cast(),
            device,
            done,
        })
    }
}

/// Host memory kernels read and write directly, held for one step by [`Gpu::host_io`]: the
/// host fills it, hands [`HostIo::device_addr`] to kernels, records [`HostIo::written`] after
/// the last launch that uses it, and reads it after [`HostIo::wait`].
pub(crate) struct HostIo<'a> {
    mapped: MutexGuard<'a, Mapped>,
    stream: &'a CudaStream,
    /// Words of the step's use.
    word_count: usize,
    /// Kernels may use the memory: it must not be reused before they are done.
    handed_out: bool,
}

impl HostIo<'_> {
    /// The buffer as words, for the host to fill before any launch uses it.
    pub(crate) fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: `word_count` words of the live pinned allocation `host` start at `words`;
        // the guard makes this step its only user, and no kernel uses it yet (the step before
        // waited for its own).
        unsafe { std::slice::from_raw_parts_mut(self.mapped.words, self.word_count) }
    }

    /// The device address for kernel params; from now on the buffer waits for the stream
    /// before it can be reused.
    pub(crate) fn device_addr(&mut self) -> u64 {
        self.handed_out = true;
        self.mapped.device
    }

    /// Marks the end of the launches that use the buffer (queued before this call).
    pub(crate) fn written(&self) -> Result<()> {
        self.mapped
            .done
            .record(self.stream)
            .map_err(Error::driver("recording an event"))
    }

    /// Waits for the launches before [`HostIo::written`] (not for work queued after it) and
    /// returns the buffer as words.
    pub(crate) fn wait(&mut self) -> Result<&[u32]> {
        self.mapped
            .done
            .synchronize()
            .map_err(Error::driver("waiting for the device"))?;
        self.handed_out = false;
        // SAFETY: as in `words_mut`; the launches that write it are done.
        Ok(unsafe { std::slice::from_raw_parts(self.mapped.words, self.word_count) })
    }
}

impl Drop for HostIo<'_> {
    fn drop(&mut self) {
        // A step that failed after handing the buffer out: the next may overwrite it only once
        // no kernel can still read or write it. An error here is the stream's and surfaces at
        // its next use.
        if self.handed_out {
            let _ = self.stream.synchronize();
        }
    }
}

/// A copy into the pinned staging buffer, queued by [`Gpu::read_back`].
pub(crate) struct Readback<'a> {
    host: MutexGuard<'a, PinnedHostSlice<u8>>,
    len: usize,
    copied: CudaEvent,
}

impl Readback<'_> {
    /// Waits for the copy (not for work queued after it) and returns the bytes.
    pub(crate) fn wait(&self) -> Result<&[u8]> {
        self.copied
            .synchronize()
            .map_err(Error::driver("waiting for a copy from the device"))?;
        let bytes = self
            .host
            .as_slice()
            .map_err(Error::driver("mapping the staging buffer"))?;
        Ok(&bytes[..self.len])
    }
}

impl Drop for Readback<'_> {
    fn drop(&mut self) {
        // The buffer may be reused or freed once the guard goes: no copy into it may be in
        // flight then. An error here is the stream's and surfaces at its next use.
        let _ = self.copied.synchronize();
    }
}

/// A `*Params` struct as a kernel argument, passed by value (cudarc's `DeviceRepr` is foreign,
/// so the abi types cannot implement it themselves).
#[repr(transparent)]
struct ByValue<P>(P);

// SAFETY: P is Pod (plain bytes, no pointers into host memory) and `#[repr(C)]` in kvc-abi,
// laid out as the kernel's `.param` aggregate (checked by tests/abi_roundtrip.rs).
unsafe impl<P: Pod> DeviceRepr for ByValue<P> {}

/// A CUDA device with the kvcompress kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// `module` is [`PTX_SM90A`].
    hopper: bool,
    functions: Mutex<HashMap<String, CudaFunction>>,
    occupancy: Mutex<HashMap<(String, u32, u32), KernelProps>>,
    workspace: Mutex<CudaSlice<u8>>,
    staging: Mutex<PinnedHostSlice<u8>>,
    host_io: Mutex<Mapped>,
    timing: Mutex<Vec<CudaEvent>>,
    props: DeviceProps,
    l2_bytes: u64,
    max_smem_bytes: u32,
    name: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("props", &self.props)
            .field("ptx_target", &self.ptx_target())
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` and loads the kernels. No driver library or no device gives
    /// [`Error::CudaUnavailable`].
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only probes for the driver library; loads nothing into the process state
        // that cudarc relies on.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable { source: None });
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| Error::CudaUnavailable { source: Some(e) })?;
        let stream = ctx.default_stream();
        let capability = ctx
            .compute_capability()
            .map_err(Error::driver("reading the compute capability"))?;
        // sm_90a code runs on compute capability 9.0 alone (it is not forward compatible).
        let hopper = capability == (9, 0) && std::env::var_os(PORTABLE_PTX_VAR).is_none();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(if hopper {
                PTX_SM90A
            } else {
                PTX
            }))
            .map_err(Error::driver("loading the PTX module"))?;
        let num_sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("reading the SM count"))? as u32;
        let l2_bytes = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(Error::driver("reading the L2 size"))? as u64;
        let max_smem_bytes = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(Error::driver("reading the shared-memory limit"))?
            as u32;
        let name = ctx
            .name()
            .map_err(Error::driver("reading the device name"))?;
        let workspace = stream
            .alloc_zeros::<u8>(INITIAL_WORKSPACE_BYTES)
            .map_err(Error::driver("allocating device memory"))?;
        let staging = pinned(&ctx, INITIAL_STAGING_BYTES, false)?;
        let host_io = Mapped::new(&ctx, INITIAL_HOST_IO_BYTES)?;
        let timing = (0..TIMING_EVENTS)
            .map(|_| new_event(&ctx))
            .collect::<Result<_>>()?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            module,
            hopper,
            functions: Mutex::new(HashMap::new()),
            occupancy: Mutex::new(HashMap::new()),
            workspace: Mutex::new(workspace),
            staging: Mutex::new(staging),
            host_io: Mutex::new(host_io),
            timing: Mutex::new(timing),
            props: DeviceProps { num_sms },
            l2_bytes,
            max_smem_bytes,
            name,
        }))
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the loaded module is the Hopper one ([`PTX_SM90A`]): launch plans whose shared
    /// memory differs by module ask.
    pub fn hopper_module(&self) -> bool {
        self.hopper
    }

    /// The loaded module's target: `sm_90a` or `sm_80`.
    pub fn ptx_target(&self) -> &'static str {
        if self.hopper {
            "sm_90a"
        } else {
            "sm_80"
        }
    }

    /// What the launch planners use.
    pub fn props(&self) -> DeviceProps {
        self.props
    }

    /// Bytes of L2 cache (benchmarks size their working sets from it).
    pub fn l2_bytes(&self) -> u64 {
        self.l2_bytes
    }

    /// The stream every kvcompress launch and copy runs on, in order.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Keeps device memory this process frees in the device's default memory pool (where
    /// every kvcompress buffer comes from) instead of returning it to the driver at the next
    /// synchronize; later allocations reuse it. For benchmarks: while the driver takes back a
    /// large release (a cache, the copy roofline's buffers), kernels that stream from DRAM run
    /// ~8% slower for a few milliseconds, whichever timed loop comes next (docs/PERF.md, window
    /// aggregation "v10").
    pub fn hold_freed_memory(&self) -> Result<()> {
        let mut pool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: `pool` and `threshold` are live locals of the types the driver writes and
        // reads (a pool handle; the release threshold is a u64); the device is this context's.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .map_err(Error::driver("getting the default memory pool"))?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
            .map_err(Error::driver("setting the memory pool's release threshold"))
        }
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::driver("synchronizing the stream"))
    }

    /// Device address of a buffer, for a `*Params` field.
    pub(crate) fn addr(&self, buf: &CudaSlice<u8>) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    /// A zeroed device buffer of `bytes` bytes.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(Error::driver("allocating device memory"))
    }

    /// A device copy of `bytes`.
    pub(crate) fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self.alloc(0);
        }
        self.stream
            .clone_htod(bytes)
            .map_err(Error::driver("copying to the device"))
    }

    /// The TMA tensor map (`CUtensorMap`'s 128 bytes) over `rows` rows of `row_bytes` bytes of
    /// 16-bit elements from device address `base`, a 2-D tensor `[rows, row_bytes / 2]`, whose
    /// boxes are 64 elements (one 128-byte panel) by `box_rows` rows, copied into shared
    /// memory with the 128-byte swizzle that `wgmma` reads. Encoding is host work only.
    pub(crate) fn tensor_map(
        &self,
        base: u64,
        rows: u64,
        row_bytes: u32,
        box_rows: u32,
    ) -> Result<[u8; 128]> {
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        let dims: [u64; 2] = [row_bytes as u64 / 2, rows];
        let strides: [u64; 1] = [row_bytes as u64];
        let boxes: [u32; 2] = [64, box_rows];
        let element_strides: [u32; 2] = [1, 1];
        // SAFETY: every pointer is to a live array of the rank's length; `map` is written, not
        // read; the driver checks the values (alignment, extents) and fails otherwise.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                2,
                base as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
        .result()
        .map_err(Error::driver("encoding a tensor map"))?;
        // SAFETY: the driver wrote the whole map.
        let map = unsafe { map.assume_init() };
        Ok(bytemuck::cast(map.opaque))
    }

    /// Overwrites `bytes.len()` bytes of `dst` from byte `offset` (stream-ordered).
    pub(crate) fn write_at(
        &self,
        bytes: &[u8],
        dst: &mut CudaSlice<u8>,
        offset: u64,
    ) -> Result<()> {
        let start = offset as usize;
        let mut view = dst.slice_mut(start..start + bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(Error::driver("copying to the device"))
    }

    /// A host copy of `buf` (waits for the stream).
    pub(crate) fn download(&self, buf: &CudaSlice<u8>) -> Result<Vec<u8>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(Error::driver("copying from the device"))
    }

    /// The shared scratch buffer, grown to at least `bytes`. Launches are stream-ordered, so
    /// one buffer serves every op; hold the guard across the launches that use it.
    pub(crate) fn workspace(&self, bytes: u64) -> Result<MutexGuard<'_, CudaSlice<u8>>> {
        let mut guard = self
            .workspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if (guard.len() as u64) < bytes {
            // The old buffer is freed stream-ordered, after the launches that use it.
            *guard = self.alloc(bytes as usize)?;
        }
        Ok(guard)
    }

    /// Queues a copy of bytes `start..end` of `buf` into the pinned staging buffer and
    /// returns at once: the host may queue more work behind it and then wait for the copy
    /// alone ([`Readback::wait`]), where `download` waits for the whole stream. One readback
    /// at a time (the buffer is held until the `Readback` is dropped).
    pub(crate) fn read_back(
        &self,
        buf: &CudaSlice<u8>,
        start: u64,
        end: u64,
    ) -> Result<Readback<'_>> {
        let len = (end - start) as usize;
        let mut host = self
            .staging
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if host.len() < len {
            // No copy into the old buffer is in flight: a Readback waits for its copy when
            // dropped, before it lets the buffer go.
            *host = pinned(&self.ctx, len.next_power_of_two(), false)?;
        }
        let view = buf.slice(start as usize..end as usize);
        let dst = &mut host
            .as_mut_slice()
            .map_err(Error::driver("mapping the staging buffer"))?[..len];
        self.stream
            .memcpy_dtoh(&view, dst)
            .map_err(Error::driver("copying from the device"))?;
        match self.event().and_then(|e| self.record(&e).map(|()| e)) {
            Ok(copied) => Ok(Readback { host, len, copied }),
            Err(e) => {
                // The copy may be in flight with nothing to wait on: wait for the stream
                // before the buffer can be reused or freed. Its own error, if any, is the
                // stream's and surfaces at its next use.
                let _ = self.synchronize();
                Err(e)
            }
        }
    }

    /// The host-mapped buffer, grown to at least `words` 4-byte words, for one step (one at a
    /// time).
    pub(crate) fn host_io(&self, words: usize) -> Result<HostIo<'_>> {
        let bytes = 4 * words;
        let mut mapped = self
            .host_io
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if mapped.host.len() < bytes {
            // No kernel uses the old buffer: a HostIo waits for them before it lets it go.
            *mapped = Mapped::new(&self.ctx, bytes.next_power_of_two())?;
        }
        Ok(HostIo {
            mapped,
            stream: &self.stream,
            word_count: words,
            handed_out: false,
        })
    }

    /// The device's `TIMING_EVENTS` timing events, for one timed step at a time (creating
    /// events for every step cost it 1-13 us, docs/PERF.md compression v16).
    pub(crate) fn timing_events(&self) -> MutexGuard<'_, Vec<CudaEvent>> {
        self.timing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new event.
    pub(crate) fn event(&self) -> Result<CudaEvent> {
        new_event(&self.ctx)
    }

    /// Records `event` on the stream.
    pub(crate) fn record(&self, event: &CudaEvent) -> Result<()> {
        event
            .record(&self.stream)
            .map_err(Error::driver("recording an event"))
    }

    /// Waits for `event` by querying it every `POLL_INTERVAL` on this thread instead of
    /// sleeping in the driver, so that the wait ends when the device passes the event, not
    /// when the host next wakes after that: for a timed step's end (docs/PERF.md, compression
    /// v22).
    pub(crate) fn poll(&self, event: &CudaEvent) -> Result<()> {
        while !event
            .try_is_complete()
            .map_err(Error::driver("waiting for an event"))?
        {
            let asked = std::time::Instant::now();
            while asked.elapsed() < POLL_INTERVAL {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Milliseconds between two recorded events (waits for the second).
    pub(crate) fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        end.synchronize()
            .map_err(Error::driver("waiting for an event"))?;
        Ok(start
            .elapsed_ms(end)
            .map_err(Error::driver("reading an event"))? as f64)
    }

    /// How many CTAs of `entry` with `threads` threads and `smem_bytes` of dynamic shared
    /// memory one SM holds at once (the driver's occupancy calculator, cached).
    pub fn kernel_props(&self, entry: &str, threads: u32, smem_bytes: u32) -> Result<KernelProps> {
        let key = (entry.to_string(), threads, smem_bytes);
        let mut cache = self
            .occupancy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(props) = cache.get(&key) {
            return Ok(*props);
        }
        let ctas_per_sm = self
            .function(entry)?
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem_bytes as usize, None)
            .map_err(Error::driver("computing occupancy"))?;
        let props = KernelProps { ctas_per_sm };
        cache.insert(key, props);
        Ok(props)
    }

    /// Sends `params` to its echo kernel and returns them as sent (with the echo target set)
    /// and the bytes the kernel received. Equal bytes mean host and device agree on the layout.
    pub fn echo<P: EchoParams>(&self, mut params: P) -> Result<(P, Vec<u8>)> {
        let dst = self.alloc(std::mem::size_of::<P>())?;
        params.set_echo_dst(self.addr(&dst));
        let dims = LaunchDims {
            grid: [1, 1, 1],
            block: [1, 1, 1],
            smem_bytes: 0,
        };
        // SAFETY: the echo kernel writes size_of::<P>() bytes to the target, which `dst` holds;
        // it reads nothing else.
        unsafe { self.launch(P::ECHO_ENTRY, dims, &params)? };
        Ok((params, self.download(&dst)?))
    }

    fn function(&self, entry: &str) -> Result<CudaFunction> {
        let mut functions = self
            .functions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(f) = functions.get(entry) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(entry)
            .map_err(|_| Error::MissingEntry {
                name: entry.to_string(),
            })?;
        // Let launches use all the shared memory a block may opt in to (`launch` checks it).
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.max_smem_bytes as i32,
        )
        .map_err(Error::driver("raising a kernel's shared-memory limit"))?;
        functions.insert(entry.to_string(), f.clone());
        Ok(f)
    }

    /// Launches `entry` with `params` by value. The only caller of cudarc's unsafe `launch`.
    ///
    /// # Safety
    /// `params` must satisfy the kernel's contract (its module's header): the launchers in
    /// `ops/` call this only after `validate` accepted the inputs and with `dims` from the
    /// kernel's planner.
    pub(crate) unsafe fn launch<P: Pod>(
        &self,
        entry: &str,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        let f = self.function(entry)?;
        let cfg = LaunchConfig {
            grid_dim: (dims.grid[0], dims.grid[1], dims.grid[2]),
            block_dim: (dims.block[0], dims.block[1], dims.block[2]),
            shared_mem_bytes: dims.smem_bytes,
        };
        let arg = ByValue(*params);
        let mut builder = self.stream.launch_builder(&f);
        builder.arg(&arg);
        // SAFETY: forwarded from the caller.
        unsafe { builder.launch(cfg) }.map_err(launch_error(entry, dims))?;
        Ok(())
    }

    /// [`Gpu::launch`] for a kernel that reads what the stream's previous kernel wrote and
    /// waits for it itself (`gpu::sync::wait_for_prior_grid` before its first such read): with
    /// the Hopper module it is launched with programmatic stream serialization, so that its
    /// CTAs may start while the previous kernel's last ones finish (once every CTA of that
    /// kernel allowed it, `allow_dependent_grid`), instead of after it.
    ///
    /// # Safety
    /// As [`Gpu::launch`]; `entry` waits for the prior grid before it touches anything that grid
    /// or an earlier launch writes.
    pub(crate) unsafe fn launch_chained<P: Pod>(
        &self,
        entry: &str,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        if !self.hopper {
            // SAFETY: forwarded from the caller.
            return unsafe { self.launch(entry, dims, params) };
        }
        let f = self.function(entry)?;
        // SAFETY: an all-zero attribute value is valid plain data; one field is then set.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: dims.grid[0],
            gridDimY: dims.grid[1],
            gridDimZ: dims.grid[2],
            blockDimX: dims.block[0],
            blockDimY: dims.block[1],
            blockDimZ: dims.block[2],
            sharedMemBytes: dims.smem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut arg = *params;
        let mut args = [(&mut arg as *mut P).cast::<std::ffi::c_void>()];
        self.ctx
            .bind_to_thread()
            .map_err(launch_error(entry, dims))?;
        // SAFETY: `config` describes a launch on this context's stream; `args` holds one
        // pointer to the kernel's single by-value parameter, laid out as its `.param`
        // aggregate (as in `launch`); the rest is forwarded from the caller.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(launch_error(entry, dims))
    }
}

/// The error of a failed launch of `entry` with `dims`.
fn launch_error(entry: &str, dims: LaunchDims) -> impl FnOnce(DriverError) -> Error + '_ {
    move |source| Error::Launch {
        entry: entry.to_string(),
        grid: dims.grid,
        block: dims.block,
        smem_bytes: dims.smem_bytes,
        source,
    }
}
