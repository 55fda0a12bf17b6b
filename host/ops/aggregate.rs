//! Launcher of observation-window score aggregation (SPEC §4): pass 1, its merge when keys
//! are split, pass 2.

use cudarc::driver::CudaSlice;
use kvc_abi::params::AggregateParams;
use kvc_abi::plan::{agg_cta, agg_ws_scores, agg_ws_stats, plan_aggregate};
use kvc_abi::{DType, Geometry};

use crate::cache::{AggregateArgs, DeviceArrays};
use crate::error::Result;
use crate::gpu::{
    window_scores_entry, window_scores_ws_entry, window_stats_entry, WINDOW_STATS_MERGE_ENTRY,
};

/// One validated aggregation call.
pub(crate) struct AggregateJob<'a> {
    pub(crate) layer: u32,
    pub(crate) max_context_len: u32,
    pub(crate) q: &'a CudaSlice<u8>,
    /// `[num_seqs, w, Hq]` f32, the window's log-sum-exp from the caller: pass 2 runs alone.
    pub(crate) lse: Option<&'a CudaSlice<u8>>,
    /// `w`, the second extent of `q`.
    pub(crate) window: u32,
    pub(crate) args: &'a AggregateArgs<'a>,
    /// `[num_seqs, 3]`: window length, last position, metric_skip.
    pub(crate) seq_info: Vec<i32>,
}

/// Runs both passes for one layer, or pass 2 alone given the log-sum-exp.
pub(crate) fn aggregate(
    d: &mut DeviceArrays,
    g: Geometry,
    dtype: DType,
    job: AggregateJob,
) -> Result<()> {
    let (hopper, elem_bytes) = (d.gpu.hopper_module(), dtype.elem_bytes());
    let ws_stats = job.lse.is_none() && agg_ws_stats(g.head_dim, elem_bytes, hopper);
    let ws_scores = agg_ws_scores(g.head_dim, elem_bytes, g.group_size, job.window, hopper);
    // The warp-specialized passes read their key tiles through a tensor map held with the cache.
    let k_map = if ws_stats || ws_scores {
        d.k_map(g)?
    } else {
        0
    };
    let gpu = &d.gpu;
    let stats_entry = window_stats_entry(dtype, g.head_dim);
    let scores_entry = if ws_scores {
        window_scores_ws_entry(dtype)
    } else {
        window_scores_entry(dtype, g.head_dim)
    };
    let resident = |entry: &str, columns: bool| -> Result<u32> {
        let (threads, smem) = agg_cta(
            g.head_dim,
            elem_bytes,
            (g.group_size, job.window),
            columns,
            hopper,
        );
        let kernel = gpu.kernel_props(entry, threads, smem)?;
        Ok(gpu.props().num_sms * kernel.ctas_per_sm.max(1))
    };
    let plan = plan_aggregate(
        &g,
        dtype,
        job.window,
        job.max_context_len,
        (
            resident(&stats_entry, false)?,
            resident(&scores_entry, true)?,
        ),
        hopper,
    );
    d.windows.update(gpu, &job.seq_info)?;
    let workspace = gpu.workspace(plan.workspace_bytes())?;
    let base = gpu.addr(&workspace);
    let params = AggregateParams {
        cache: d.view(g),
        q: gpu.addr(job.q),
        stats: base,
        partials: base + plan.partials_offset(),
        seq_info: gpu.addr(&d.windows.buf),
        k_map,
        lse: job.lse.map_or(0, |lse| gpu.addr(lse)),
        layer_idx: job.layer,
        window: job.window,
        key_splits: plan.key_splits,
        split_kvs: plan.split_kvs,
        scale_log2: job.args.scale * std::f32::consts::LOG2_E,
        record: job.args.metric.code(),
        pool_half: job.args.pool_kernel / 2,
        score_kvs: plan.score_kvs,
    };
    // SAFETY: validate::aggregate checked q, the window lengths (within q and the prompt),
    // metric_skip, the pool width (within the kernels' halo) and the scale; the cache's tables
    // are valid by construction; the workspace holds the plan's stats and partials, `seq_info`
    // this call's windows, and `lse` (validated) the window's log-sum-exp.
    unsafe {
        if job.lse.is_some() {
            return gpu.launch(&scores_entry, plan.scores, &params);
        }
        gpu.launch(&stats_entry, plan.stats, &params)?;
        // Both wait for the launch before them before they read (`wait_for_prior_grid`).
        if let Some(merge) = plan.merge {
            gpu.launch_chained(WINDOW_STATS_MERGE_ENTRY, merge, &params)?;
        }
        gpu.launch_chained(&scores_entry, plan.scores, &params)?;
    }
    Ok(())
}
