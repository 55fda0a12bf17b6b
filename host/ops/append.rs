//! Launcher of `append_kv` (SPEC §2) and of table patches alone.

use cudarc::driver::CudaSlice;
use kvc_abi::params::AppendParams;
use kvc_abi::plan::{append_scatter_ctas, plan_append};
use kvc_abi::{DType, Geometry};

use crate::cache::DeviceArrays;
use crate::error::Result;
use crate::gpu::APPEND_ENTRY;

/// One change of the device's `block_tables` or `context_lens`, as the kernel applies it:
/// indices below `block_table_len()` address `block_tables`, the rest `context_lens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Patch {
    index: u32,
    value: i32,
}

impl Patch {
    /// Sets `block_tables[index]`.
    pub(crate) fn table(index: u64, block: i32) -> Self {
        Self {
            index: index as u32,
            value: block,
        }
    }

    /// Sets the length of `head_slot`.
    pub(crate) fn len(g: &Geometry, head_slot: u64, len: i32) -> Self {
        Self {
            index: (g.block_table_len() + head_slot) as u32,
            value: len,
        }
    }
}

/// What the host decided for one append: the pool slot of every new row `(token, kv_head)`,
/// the token positions, and the table and length changes.
pub(crate) struct AppendMeta<'a> {
    pub(crate) dest_slots: Vec<u32>,
    pub(crate) positions: &'a [i32],
    pub(crate) patches: Vec<Patch>,
}

/// Scatters `k_new`/`v_new` `[num_tokens, H, D]` to `meta.dest_slots` and applies the patches,
/// in one launch.
pub(crate) fn append_kv(
    d: &DeviceArrays,
    g: Geometry,
    dtype: DType,
    k_new: &CudaSlice<u8>,
    v_new: &CudaSlice<u8>,
    meta: &AppendMeta,
) -> Result<()> {
    let num_tokens = meta.positions.len() as u32;
    launch(d, g, dtype, Some((k_new, v_new)), num_tokens, meta)
}

/// Applies `patches` alone (a launch with no rows to scatter).
pub(crate) fn apply_patches(
    d: &DeviceArrays,
    g: Geometry,
    dtype: DType,
    patches: Vec<Patch>,
) -> Result<()> {
    let meta = AppendMeta {
        dest_slots: Vec::new(),
        positions: &[],
        patches,
    };
    launch(d, g, dtype, None, 0, &meta)
}

fn launch(
    d: &DeviceArrays,
    g: Geometry,
    dtype: DType,
    rows: Option<(&CudaSlice<u8>, &CudaSlice<u8>)>,
    num_tokens: u32,
    meta: &AppendMeta,
) -> Result<()> {
    if meta.dest_slots.is_empty() && meta.patches.is_empty() {
        return Ok(());
    }
    let mut words: Vec<u32> =
        Vec::with_capacity(meta.dest_slots.len() + meta.positions.len() + 2 * meta.patches.len());
    words.extend_from_slice(&meta.dest_slots);
    words.extend(meta.positions.iter().map(|&p| p as u32));
    for patch in &meta.patches {
        words.push(patch.index);
        words.push(patch.value as u32);
    }
    let gpu = &d.gpu;
    let bytes: &[u8] = bytemuck::cast_slice(&words);
    let mut meta_buf = gpu.workspace(bytes.len() as u64)?;
    // Stream-ordered after every earlier launch that used the workspace.
    gpu.write_at(bytes, &mut meta_buf, 0)?;
    let (k_new, v_new) = rows.map_or((0, 0), |(k, v)| (gpu.addr(k), gpu.addr(v)));
    let mut params = AppendParams {
        cache: d.view(g),
        k_new,
        v_new,
        meta: gpu.addr(&meta_buf),
        num_tokens,
        num_patches: meta.patches.len() as u32,
        row_bytes: g.head_dim * dtype.elem_bytes(),
        scatter_ctas: 0,
    };
    params.scatter_ctas = append_scatter_ctas(params.num_rows());
    debug_assert_eq!(params.meta_words(), words.len() as u64);
    // SAFETY: validate::append checked shapes, counts and capacity; the destination slots
    // lie in blocks just allocated to these head slots, and every patch index lies inside
    // the tables (Patch constructors take validated head slots and table indices).
    unsafe { gpu.launch(APPEND_ENTRY, plan_append(&params), &params) }
}
