//! Launcher of paged decode attention (SPEC §3): the attention launch (with metric recording
//! when asked), then the merge launch when the plan splits the KV range.

use cudarc::driver::CudaSlice;
use kvc_abi::params::{record, DecodeParams};
use kvc_abi::plan::{decode_smem, max_partition_kvs, plan_decode, DECODE_WARPS, WARP_SIZE};
use kvc_abi::{DType, Geometry};

use crate::cache::{DecodeArgs, DeviceArrays};
use crate::error::Result;
use crate::gpu::{decode_entry, decode_merge_entry};

/// One validated decode call.
pub(crate) struct DecodeJob<'a> {
    pub(crate) layer: u32,
    /// The longest head slot of the layer (it sizes the grid).
    pub(crate) max_context_len: u32,
    pub(crate) q: &'a CudaSlice<u8>,
    pub(crate) out: &'a mut CudaSlice<u8>,
    pub(crate) args: &'a DecodeArgs<'a>,
    /// `[num_seqs]` `last_position - metric_skip`, when recording.
    pub(crate) thresholds: Option<&'a [i32]>,
}

/// Runs decode attention of one layer over every sequence row.
pub(crate) fn decode(
    d: &mut DeviceArrays,
    g: Geometry,
    dtype: DType,
    job: DecodeJob,
) -> Result<()> {
    let gpu = &d.gpu;
    let recording = job.args.record.is_some();
    let entry = decode_entry(dtype, g.head_dim, g.group_size, recording);
    // Occupancy at the longest partition the policy takes (a longer context's partitions take
    // more shared memory for their block ids: `plan_decode`).
    let smem = decode_smem(g.group_size, g.head_dim, dtype.elem_bytes())
        .bytes_for(max_partition_kvs(g.group_size));
    let kernel = gpu.kernel_props(&entry, DECODE_WARPS * WARP_SIZE, smem)?;
    let plan = plan_decode(
        &g,
        dtype,
        job.max_context_len,
        &gpu.props(),
        &kernel,
        job.args.partition_kvs,
        recording,
    );
    if let Some(thresholds) = job.thresholds {
        // The handshake counters need no copy (the kernel leaves them zero); the thresholds
        // change once per decode step, not per layer.
        d.recording.thresholds.update(gpu, thresholds)?;
    }
    let workspace = gpu.workspace(plan.workspace_bytes(g.head_dim))?;
    let base = gpu.addr(&workspace);
    let params = DecodeParams {
        cache: d.view(g),
        q: gpu.addr(job.q),
        out: gpu.addr(job.out),
        partial_acc: base,
        partial_ml: base + plan.partial_ml_offset(g.head_dim),
        layer_idx: job.layer,
        partition_kvs: plan.partition_kvs,
        num_partitions: plan.num_partitions,
        scale_log2: job.args.scale * std::f32::consts::LOG2_E,
        record: job.args.record.map_or(record::OFF, |r| r.metric.code()),
        reserved: 0,
        thresholds: gpu.addr(&d.recording.thresholds.buf),
        counters: gpu.addr(&d.recording.counters),
        stash: base + plan.stash_offset(g.head_dim),
    };
    // SAFETY: validate::decode checked q, out, layer, scale and metric_skip; the cache's
    // tables are valid by construction (PagedKvCache); the workspace holds the plan's
    // partials and score stash; the cache's counters are zero (allocated so, left so by every
    // launch) and, when recording, its thresholds are this call's; plan_decode keeps a head
    // slot's partitions within the SM count and sizes the block-id table for its partitions.
    unsafe {
        gpu.launch(&entry, plan.decode, &params)?;
        if let Some(merge) = plan.merge {
            // It waits for the decode launch before it reads (`wait_for_prior_grid`).
            gpu.launch_chained(&decode_merge_entry(dtype), merge, &params)?;
        }
    }
    Ok(())
}
