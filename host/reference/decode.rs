//! Reference paged decode attention (SPEC §3).

use super::HostCache;
use crate::cache::Metric;
use crate::dtype::{read_elem, write_elem};

/// Metric recording of one reference decode (SPEC §3).
pub struct RecordArgs<'a> {
    /// Squared attention (L2) or attention (L1).
    pub metric: Metric,
    /// `[num_seqs]`: the newest position of each sequence.
    pub last_position: &'a [i32],
    /// `[num_seqs]`: KVs with position `> last_position - metric_skip` are not recorded.
    pub metric_skip: &'a [i32],
}

/// For every sequence row `seq` and query head `qh` of layer `layer`:
///
/// ```text
/// s_j = scale * dot(q[seq, qh], K_j)       for the live KVs j of head slot (seq, layer, qh / G)
/// a_j = exp(s_j - max s) / sum exp(s - max s)
/// out[seq, qh] = sum_j a_j V_j             (rounded to the cache dtype; zeros if no KV is live)
/// ```
///
/// With `record`, for every live KV `j` with `position(j) <= last_position[seq] -
/// metric_skip[seq]`, `metric[slot(j)] += sum over the G query heads of a_j^2` (L2) or `a_j`
/// (L1), the sum taken in f64 and added to the f32 metric once.
///
/// `q` and `out` are bytes of the cache dtype, `[num_seqs, Hq, D]`; inputs are validated by
/// the caller (`PagedKvCache::decode`). Accumulation is in f64.
pub fn decode(
    cache: &HostCache,
    layer: u32,
    q: &[u8],
    scale: f32,
    out: &mut [u8],
    metric: &mut [f32],
    record: Option<&RecordArgs>,
) {
    let g = cache.geometry;
    let d = g.head_dim as usize;
    for seq in 0..g.num_seqs {
        for kv_head in 0..g.num_kv_heads {
            let head_slot = g.head_slot(seq, layer, kv_head);
            let len = cache.len(head_slot);
            let keys: Vec<Vec<f64>> = (0..len)
                .map(|j| cache.row(cache.k_pool, head_slot, j))
                .collect();
            let values: Vec<Vec<f64>> = (0..len)
                .map(|j| cache.row(cache.v_pool, head_slot, j))
                .collect();
            let mut recorded = vec![0.0f64; len as usize];
            for qh in kv_head * g.group_size..(kv_head + 1) * g.group_size {
                let q_first = (seq as usize * g.num_q_heads() as usize + qh as usize) * d;
                let query: Vec<f64> = (0..d)
                    .map(|i| read_elem(cache.dtype, q, q_first + i))
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| scale as f64 * query.iter().zip(k).map(|(a, b)| a * b).sum::<f64>())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let mut acc = vec![0.0f64; d];
                for (j, (w, v)) in weights.iter().zip(&values).enumerate() {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += w / sum * x;
                    }
                    if let Some(r) = record {
                        let a = w / sum;
                        recorded[j] += match r.metric {
                            Metric::L2 => a * a,
                            Metric::L1 => a,
                        };
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    write_elem(cache.dtype, out, q_first + i, *a);
                }
            }
            if let Some(r) = record {
                let threshold =
                    r.last_position[seq as usize] as i64 - r.metric_skip[seq as usize] as i64;
                for (j, value) in recorded.iter().enumerate() {
                    let (block, slot) = cache.locate(head_slot, j as u32);
                    let pool_slot = g.pool_slot(block, slot) as usize;
                    if cache.position[pool_slot] as i64 <= threshold {
                        metric[pool_slot] = (metric[pool_slot] as f64 + value) as f32;
                    }
                }
            }
        }
    }
}
