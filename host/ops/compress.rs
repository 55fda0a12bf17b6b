//! Launchers of the compression step on the GPU (SPEC §5-§7): four radix passes of
//! histograms and digit choices (`schedule.rs`), the budget after the first, the blocks per
//! head slot after the last, then compaction (`compact.rs`).
//!
//! The schedule's per-head results (blocks to free, KVs to evict) are all the host needs to
//! bring its tables, lengths and allocator up to date, so they are read back before the
//! compaction is launched, and the host's per-block work (a table entry and a free-list entry
//! per freed block: 1.8 M at 16 x 8192, both in pages touched before) runs while the device
//! compacts. A timed step ends with a read-back of the moves per head slot, which waits for
//! the compaction; an untimed one returns without waiting (stream order covers what follows).

use kvc_abi::params::compress::{
    BUDGET_BLOCKS, BUDGET_RATE, BUDGET_TOKENS, HEAD_BELOW, HEAD_BLOCKS, HEAD_EVICTIONS,
    RADIX_PASSES, SEQ_IN_WORDS, SEQ_OUT_CLAMPED, SEQ_OUT_REQUESTED, SEQ_OUT_TAKEN,
};
use kvc_abi::params::CompressParams;
use kvc_abi::plan::{plan_compress, HIST_CHUNK_KVS};

use crate::cache::{Arrays, PagedKvCache};
use crate::compress::{
    over_budget, Budget, CompressArgs, CompressReport, CompressTimes, HeadReport, SeqReport,
};
use crate::error::Result;
use crate::gpu::{
    COMPACT_ENTRY, SCHED_BUDGET_ENTRY, SCHED_DIGIT_ENTRY, SCHED_FINAL_ENTRY, SCHED_HIST_ENTRY,
};
use crate::validate;

/// Runs the step on the cache's device and brings the host's view up to date. With `timed`,
/// waits for the compaction and reports the device times and moves; without, returns while
/// the compaction may still run (`CompressTimes` then holds only `host_ms`).
pub(crate) fn compress(
    cache: &mut PagedKvCache,
    args: &CompressArgs,
    timed: bool,
) -> Result<(CompressReport, CompressTimes)> {
    let g = cache.geometry();
    let heads_per_seq = g.num_layers * g.num_kv_heads;
    let num_work_seqs = args.seqs.len() as u32;
    let mut report = CompressReport {
        seqs: Vec::new(),
        heads: Vec::new(),
    };
    if num_work_seqs == 0 {
        return Ok((report, CompressTimes::default()));
    }
    let group_heads = args.mode.group_heads(g.num_layers, g.num_kv_heads);
    let max_context_len = args
        .seqs
        .iter()
        .flat_map(|&seq| (0..heads_per_seq).map(move |i| (seq, i)))
        .map(|(seq, i)| cache.context_len(seq, i / g.num_kv_heads, i % g.num_kv_heads))
        .max()
        .unwrap_or(0);
    let plan = plan_compress(&g, num_work_seqs, group_heads, max_context_len);
    let [seq_in_at, seq_out_at, heads_at, groups_at, status_at, hist_at] =
        plan.offsets(num_work_seqs);
    let mut seq_in = Vec::with_capacity((num_work_seqs * SEQ_IN_WORDS) as usize);
    for ((&seq, budget), &protected) in args.seqs.iter().zip(args.budgets).zip(args.protected) {
        let (kind, value) = match *budget {
            Budget::Blocks(n) => (BUDGET_BLOCKS, n),
            Budget::Rate(rate) => (BUDGET_RATE, rate.to_bits()),
            Budget::MaxTokens(t) => (BUDGET_TOKENS, t),
        };
        seq_in.extend([seq, kind, value, protected, cache.last_position(seq) as u32]);
    }
    let Arrays::Cuda(d) = &cache.arrays else {
        return Err(validate::backend_mismatch("cache"));
    };
    let gpu = &d.gpu;
    let mut workspace = gpu.workspace(plan.workspace_bytes(num_work_seqs))?;
    // The inputs, then zeros for the outputs and status (one copy), and zeroed histograms.
    let mut words = seq_in;
    words.resize(((hist_at - seq_in_at) / 4) as usize, 0);
    gpu.write_at(bytemuck::cast_slice(&words), &mut workspace, seq_in_at)?;
    gpu.zero(&mut workspace, hist_at, plan.hist_bytes())?;
    let base = gpu.addr(&workspace);
    let mut params = CompressParams {
        cache: d.view(g),
        seq_in: base + seq_in_at,
        seq_out: base + seq_out_at,
        heads: base + heads_at,
        groups: base + groups_at,
        hist: base + hist_at,
        status: base + status_at,
        num_work_seqs,
        group_heads,
        sinks: args.sinks,
        pass: 0,
        chunk_kvs: HIST_CHUNK_KVS,
        chunks_per_head: plan.chunks_per_head,
        row_bytes: g.head_dim * cache.dtype().elem_bytes(),
        reserved: 0,
    };
    let events = [gpu.event()?, gpu.event()?, gpu.event()?, gpu.event()?];
    gpu.record(&events[0])?;
    // SAFETY: validate::compress checked the sequence rows (distinct, in range), one budget
    // and protected window each, rates >= 1; the tables are valid by construction; the
    // workspace holds the plan's arrays, the histograms and status zeroed.
    unsafe {
        for pass in 0..RADIX_PASSES {
            params.pass = pass;
            gpu.launch(SCHED_HIST_ENTRY, plan.hist, &params)?;
            if pass == 0 {
                gpu.launch(SCHED_BUDGET_ENTRY, plan.budget, &params)?;
            }
            gpu.launch(SCHED_DIGIT_ENTRY, plan.digit, &params)?;
        }
        gpu.launch(SCHED_FINAL_ENTRY, plan.finish, &params)?;
    }
    gpu.record(&events[1])?;
    let results: Vec<u32> =
        bytemuck::pod_collect_to_vec(&gpu.download_range(&workspace, 0, hist_at)?);
    let seq_out =
        |s: u32, field: u32| results[(seq_out_at / 4 + params.seq_out_word(s, field)) as usize];
    let head = |w: u32, field: u32| results[(heads_at / 4 + params.head_word(w, field)) as usize];
    let seq_reports: Vec<SeqReport> = args
        .seqs
        .iter()
        .enumerate()
        .map(|(s, &seq)| SeqReport {
            seq,
            requested_blocks: seq_out(s as u32, SEQ_OUT_REQUESTED),
            freed_blocks: seq_out(s as u32, SEQ_OUT_TAKEN),
            clamped: seq_out(s as u32, SEQ_OUT_CLAMPED) != 0,
        })
        .collect();
    if results[(status_at / 4) as usize] != 0 {
        // An explicit block budget could not be met: compaction did not run.
        let s = seq_reports
            .iter()
            .zip(args.budgets)
            .find(|(s, b)| s.clamped && matches!(b, Budget::Blocks(_)))
            .map_or(&seq_reports[0], |(s, _)| s);
        return Err(over_budget(s.seq, s.requested_blocks, s.freed_blocks));
    }
    gpu.record(&events[2])?;
    // SAFETY: as above, after the schedule's last digit pass; the status word is 0.
    unsafe { gpu.launch(COMPACT_ENTRY, plan.compact, &params)? };
    gpu.record(&events[3])?;
    let host_start = std::time::Instant::now();
    report
        .heads
        .reserve_exact((num_work_seqs * heads_per_seq) as usize);
    for (s, &seq) in args.seqs.iter().enumerate() {
        for i in 0..heads_per_seq {
            let w = s as u32 * heads_per_seq + i;
            let head_slot = g.head_slot(seq, i / g.num_kv_heads, i % g.num_kv_heads);
            let blocks = head(w, HEAD_BLOCKS);
            let evicted = head(w, HEAD_EVICTIONS);
            if blocks > 0 {
                let len = cache.context_lens[head_slot as usize] as u32;
                let first = g.block_table_at(head_slot, g.blocks_for(len - evicted)) as usize;
                let released = &mut cache.block_tables[first..first + blocks as usize];
                // Live table entries are block ids, never -1.
                cache.allocator.free_owned(bytemuck::cast_slice(released));
                released.fill(-1);
                cache.context_lens[head_slot as usize] = (len - evicted) as i32;
            }
            report.heads.push(HeadReport {
                head_slot,
                evicted: if blocks > 0 { evicted } else { 0 },
                blocks_freed: blocks,
            });
        }
    }
    report.seqs = seq_reports;
    let host_ms = host_start.elapsed().as_secs_f64() * 1e3;
    if !timed {
        let times = CompressTimes {
            host_ms,
            ..CompressTimes::default()
        };
        return Ok((report, times));
    }
    // The compaction left the moves of each head slot in HEAD_BELOW.
    let heads: Vec<u32> =
        bytemuck::pod_collect_to_vec(&gpu.download_range(&workspace, heads_at, groups_at)?);
    drop(workspace);
    let moved_kvs = (0..num_work_seqs * heads_per_seq)
        .filter(|&w| head(w, HEAD_BLOCKS) > 0)
        .map(|w| heads[params.head_word(w, HEAD_BELOW) as usize] as u64)
        .sum();
    let times = CompressTimes {
        schedule_ms: gpu.elapsed_ms(&events[0], &events[1])?,
        compact_ms: gpu.elapsed_ms(&events[2], &events[3])?,
        host_ms,
        moved_kvs,
        ..CompressTimes::default()
    };
    Ok((report, times))
}
