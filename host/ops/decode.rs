//! Launcher of paged decode attention (SPEC §3): the attention launch, then the merge launch
//! when the plan splits the KV range.

use cudarc::driver::CudaSlice;
use kvc_abi::params::DecodeParams;
use kvc_abi::plan::plan_decode;
use kvc_abi::{DType, Geometry};

use crate::cache::{DecodeArgs, DeviceArrays};
use crate::error::Result;
use crate::gpu::{decode_entry, decode_merge_entry};

/// Runs decode attention of `layer` over every sequence row. `max_context_len` is the longest
/// head slot of the layer (it sizes the grid).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    d: &DeviceArrays,
    g: Geometry,
    dtype: DType,
    max_context_len: u32,
    layer: u32,
    q: &CudaSlice<u8>,
    out: &mut CudaSlice<u8>,
    args: &DecodeArgs,
) -> Result<()> {
    let gpu = &d.gpu;
    let plan = plan_decode(&g, dtype, max_context_len, &gpu.props(), args.partition_kvs);
    let workspace = gpu.workspace(plan.workspace_bytes(g.head_dim))?;
    let base = gpu.addr(&workspace);
    let params = DecodeParams {
        cache: d.view(g),
        q: gpu.addr(q),
        out: gpu.addr(out),
        partial_acc: base,
        partial_ml: base + plan.partial_ml_offset(g.head_dim),
        layer_idx: layer,
        partition_kvs: plan.partition_kvs,
        num_partitions: plan.num_partitions,
        scale_log2: args.scale * std::f32::consts::LOG2_E,
    };
    // SAFETY: validate::decode checked q, out, layer and scale; the cache's tables are valid
    // by construction (PagedKvCache); the workspace holds plan.partial_rows rows.
    unsafe {
        gpu.launch(
            &decode_entry(dtype, g.head_dim, g.group_size),
            plan.decode,
            &params,
        )?;
        if let Some(merge) = plan.merge {
            gpu.launch(&decode_merge_entry(dtype), merge, &params)?;
        }
    }
    Ok(())
}
