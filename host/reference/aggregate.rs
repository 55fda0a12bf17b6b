//! Reference observation-window score aggregation (SPEC §4).

use kvc_abi::DType;

use super::HostCache;
use crate::cache::Metric;
use crate::dtype::read_elem;

/// Inputs of one reference aggregation.
pub struct AggregateRef<'a> {
    /// `[num_seqs, w, Hq, D]` window queries, bytes of the cache dtype.
    pub q: &'a [u8],
    /// `[num_seqs, w, Hq]` f32 bytes: each query's log-sum-exp, given by the caller in place of
    /// the softmax's own max and sum; `None` computes them.
    pub lse: Option<&'a [u8]>,
    /// `w`, the second extent of `q`.
    pub window: u32,
    /// `[num_seqs]`: the first `window_lens[seq]` queries of a row are its last prompt tokens.
    pub window_lens: &'a [u32],
    /// Softmax scale applied to `q . k`.
    pub scale: f32,
    /// Squared attention (L2) or attention (L1).
    pub metric: Metric,
    /// `[num_seqs]`.
    pub metric_skip: &'a [i32],
    /// `[num_seqs]`.
    pub last_position: &'a [i32],
    /// Odd max-pool width over neighbouring logical keys; 1 = no pooling.
    pub pool_kernel: u32,
}

/// For every sequence row with a window and every KV head of `layer`, literally as SPEC §4:
///
/// ```text
/// query i of the window has position p_i = last_position - (w_s - 1 - i)
/// a_{i,j} = softmax over keys with position <= p_i of scale * dot(q_i, K_j)
///         = exp(scale * dot(q_i, K_j) - lse_i) with the caller's lse_i
/// m_qh[j] = sum_i a_{i,j}^2 (L2) or a_{i,j} (L1), counted where position(j) <= p_i - skip
/// m_qh    = max-pool of m_qh over logical keys j - k/2 ..= j + k/2 (zero padding)
/// metric[slot(j)] += sum over the G query heads of m_qh[j]
/// ```
///
/// Accumulation in f64; each KV's metric gets one f32 addition.
pub fn aggregate(cache: &HostCache, layer: u32, args: &AggregateRef, metric: &mut [f32]) {
    let g = cache.geometry;
    let d = g.head_dim as usize;
    let hq = g.num_q_heads() as usize;
    let half = (args.pool_kernel / 2) as usize;
    for seq in 0..g.num_seqs {
        let w_s = args.window_lens[seq as usize] as i64;
        if w_s == 0 {
            continue;
        }
        let last = args.last_position[seq as usize] as i64;
        let skip = args.metric_skip[seq as usize] as i64;
        for kv_head in 0..g.num_kv_heads {
            let head_slot = g.head_slot(seq, layer, kv_head);
            let len = cache.len(head_slot) as usize;
            let keys: Vec<Vec<f64>> = (0..len as u32)
                .map(|j| cache.row(cache.k_pool, head_slot, j))
                .collect();
            let slots: Vec<usize> = (0..len as u32)
                .map(|j| {
                    let (block, slot) = cache.locate(head_slot, j);
                    g.pool_slot(block, slot) as usize
                })
                .collect();
            let positions: Vec<i64> = slots.iter().map(|&s| cache.position[s] as i64).collect();
            let mut total = vec![0.0f64; len];
            for qh in kv_head * g.group_size..(kv_head + 1) * g.group_size {
                let mut m = vec![0.0f64; len];
                for i in 0..w_s {
                    let p_i = last - (w_s - 1 - i);
                    let query =
                        (seq as usize * args.window as usize + i as usize) * hq + qh as usize;
                    let q: Vec<f64> = (0..d)
                        .map(|x| read_elem(cache.dtype, args.q, query * d + x))
                        .collect();
                    let lse = args.lse.map(|lse| read_elem(DType::F32, lse, query));
                    let visible: Vec<usize> = (0..len).filter(|&j| positions[j] <= p_i).collect();
                    if visible.is_empty() {
                        continue;
                    }
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            args.scale as f64
                                * q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    // a = exp(s - shift) / sum: the max and the sum, or the lse and 1.
                    let (shift, sum) = match lse {
                        Some(lse) => (lse, 1.0),
                        None => {
                            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            (max, scores.iter().map(|s| (s - max).exp()).sum())
                        }
                    };
                    for (&j, s) in visible.iter().zip(&scores) {
                        if positions[j] <= p_i - skip {
                            let a = (s - shift).exp() / sum;
                            m[j] += match args.metric {
                                Metric::L2 => a * a,
                                Metric::L1 => a,
                            };
                        }
                    }
                }
                for (j, t) in total.iter_mut().enumerate() {
                    let lo = j.saturating_sub(half);
                    let hi = (j + half).min(len - 1);
                    // Zero padding: neighbours outside 0..len count as 0, and every m is >= 0.
                    *t += m[lo..=hi].iter().copied().fold(0.0f64, f64::max);
                }
            }
            for (j, &slot) in slots.iter().enumerate() {
                metric[slot] = (metric[slot] as f64 + total[j]) as f32;
            }
        }
    }
}
