//! Launchers of the compression step on the GPU (SPEC §5-§7): `sched_init`, four radix
//! passes of histograms and digit choices (`schedule.rs`), the budget after the first (the last
//! digit pass also gives each head slot its blocks), then compaction (`compact.rs`).
//!
//! The host's inputs and results travel through host-mapped memory, so no copy or memset
//! stands between the host's call and the first kernel, nor between the schedule and the
//! compaction: `sched_init` reads the inputs from it and clears the schedule's state, and the
//! budget kernel and the last digit pass write the per-sequence reports and per-head results
//! (blocks to free, KVs to evict: all the host needs to bring its tables, lengths and
//! allocator up to date) there as well as to the workspace. The host waits for the schedule
//! alone and does its per-block work (a table entry and a free-list entry per freed block:
//! 1.8 M at 16 x 8192, both in pages touched before) while the device compacts. An explicit
//! budget that cannot be met sets `status`, and the compaction then changes nothing. A timed
//! step polls for the compaction's end event (where its `step_ms` stops), then reads back the
//! moves per head slot for the report; an untimed one returns without waiting (stream order
//! covers what follows).
//! Past `PARALLEL_RELEASE_BLOCKS` that work is shared by threads, each a run of head slots with
//! its own stretch of the free list, so the order of the free list is the same either way.

use kvc_abi::params::compress::{
    BUDGET_BLOCKS, BUDGET_RATE, BUDGET_TOKENS, HEAD_BELOW, IO_HEAD_BLOCKS, IO_HEAD_EVICTIONS,
    LISTED_PASS, RADIX_PASSES, SEQ_IN_BUDGET_KIND, SEQ_IN_BUDGET_VALUE, SEQ_IN_LAST_POSITION,
    SEQ_IN_PROTECTED, SEQ_IN_SEQ, SEQ_OUT_CLAMPED, SEQ_OUT_REQUESTED, SEQ_OUT_TAKEN,
};
use kvc_abi::params::CompressParams;
use kvc_abi::plan::plan_compress;
use kvc_abi::Geometry;

use crate::allocator::BlockAllocator;
use crate::cache::{Arrays, PagedKvCache};
use crate::compress::{
    over_budget, Budget, CompressArgs, CompressReport, CompressTimes, HeadReport, SeqReport,
};
use crate::error::{Error, Result};
use crate::gpu::{
    COMPACT_ENTRY, COMPACT_NARROW_ENTRY, SCHED_BUDGET_ENTRY, SCHED_DIGIT_ENTRY, SCHED_HIST_ENTRIES,
    SCHED_INIT_ENTRY,
};
use crate::validate;

/// Blocks a step releases below which one thread does the host's per-block work. H100 host,
/// Llama-3.1-8B at rate 8: 458 K blocks at 1x32768 take one thread 0.34 ms, under the 0.47 ms
/// compaction it runs beside, and 8 threads 0.69 ms (starting threads costs more than they
/// save); 1.8 M at 16x8192 take one thread 1.4-2.1 ms, more than the compaction (1.8 ms), and
/// 8 threads 0.80 ms (docs/PERF.md compression v9).
const PARALLEL_RELEASE_BLOCKS: usize = 1 << 20;
/// Most threads for the per-block work (it is bound by memory bandwidth, not cores).
const MAX_RELEASE_THREADS: usize = 8;

/// One head slot's part of the host's per-block work: its released table entries, which
/// become `-1` after they are copied to its stretch of the free list, and its new length.
struct Release<'a> {
    table: &'a mut [i32],
    free: &'a mut [u32],
    len: &'a mut i32,
    kept: i32,
}

impl Release<'_> {
    fn run(self) {
        // Live table entries are block ids, never -1.
        self.free.copy_from_slice(bytemuck::cast_slice(self.table));
        self.table.fill(-1);
        *self.len = self.kept;
    }
}

/// Brings the host's tables, lengths and allocator up to date with the schedule's `heads`
/// (grouped by sequence, as the step reports them): each head slot's released blocks go onto
/// the free list in head-slot order (the order `CompressReport` documents), on several
/// threads when there are many. Checks every range before changing anything; touches only
/// the compressed sequences' rows.
fn release_blocks(
    g: &Geometry,
    block_tables: &mut [i32],
    context_lens: &mut [i32],
    allocator: &mut BlockAllocator,
    heads: &[HeadReport],
) -> Result<()> {
    let total: usize = heads.iter().map(|h| h.blocks_freed as usize).sum();
    let heads_per_seq = (g.num_layers * g.num_kv_heads).max(1) as usize;
    let blocks_per_head = g.max_blocks_per_head as usize;
    let seq_of = |h: &HeadReport| h.head_slot as usize / heads_per_seq;
    let bad = |h: &HeadReport| {
        Error::invalid(
            "schedule",
            h.head_slot,
            "a head slot once, within its table",
        )
    };
    // Each sequence's rows, taken once: the head slots' tables and lengths are then disjoint.
    let mut seq_tables: Vec<Option<&mut [i32]>> = block_tables
        .chunks_mut(heads_per_seq * blocks_per_head)
        .map(Some)
        .collect();
    let mut seq_lens: Vec<Option<&mut [i32]>> =
        context_lens.chunks_mut(heads_per_seq).map(Some).collect();
    let mut jobs = Vec::with_capacity(heads.len());
    for seq_heads in heads.chunk_by(|a, b| seq_of(a) == seq_of(b)) {
        let h = &seq_heads[0];
        let (Some(tables), Some(lens)) = (
            seq_tables.get_mut(seq_of(h)).and_then(Option::take),
            seq_lens.get_mut(seq_of(h)).and_then(Option::take),
        ) else {
            return Err(bad(h));
        };
        let mut tables: Vec<Option<&mut [i32]>> =
            tables.chunks_mut(blocks_per_head).map(Some).collect();
        let mut lens: Vec<Option<&mut i32>> = lens.iter_mut().map(Some).collect();
        for h in seq_heads.iter().filter(|h| h.blocks_freed > 0) {
            let i = h.head_slot as usize % heads_per_seq;
            let (Some(table), Some(len)) = (tables[i].take(), lens[i].take()) else {
                return Err(bad(h));
            };
            let kept = (*len as u32).checked_sub(h.evicted).ok_or_else(|| bad(h))?;
            let first = g.blocks_for(kept) as usize;
            let table = table
                .get_mut(first..first + h.blocks_freed as usize)
                .ok_or_else(|| bad(h))?;
            jobs.push((table, len, kept as i32));
        }
    }
    let mut free = allocator.free_owned_tail(total)?;
    let mut jobs: Vec<Release> = jobs
        .into_iter()
        .map(|(table, len, kept)| {
            let (mine, rest) = std::mem::take(&mut free).split_at_mut(table.len());
            free = rest;
            Release {
                table,
                free: mine,
                len,
                kept,
            }
        })
        .collect();
    let threads = if total < PARALLEL_RELEASE_BLOCKS {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_RELEASE_THREADS))
    };
    // Contiguous runs of head slots with about `total / threads` blocks each.
    let per_thread = total.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        while !jobs.is_empty() {
            let mut blocks = 0;
            let take = jobs
                .iter()
                .position(|job| {
                    blocks += job.table.len();
                    blocks >= per_thread
                })
                .map_or(jobs.len(), |i| i + 1);
            let part: Vec<Release> = jobs.drain(..take).collect();
            let run = move || part.into_iter().for_each(Release::run);
            if jobs.is_empty() {
                run();
            } else {
                scope.spawn(run);
            }
        }
    });
    Ok(())
}

/// Runs the step on the cache's device and brings the host's view up to date. With `timed`,
/// waits for the compaction and reports the device times and moves (`step_ms` ends when the
/// compaction does); without, returns while the compaction may still run (`CompressTimes` then
/// holds only `host_ms` and `step_ms`, the call's time). `start` is when the step began.
pub(crate) fn compress(
    cache: &mut PagedKvCache,
    args: &CompressArgs,
    timed: bool,
    start: std::time::Instant,
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
    // A sequence's head slots are consecutive rows of the lengths.
    let max_context_len = args
        .seqs
        .iter()
        .flat_map(|&seq| {
            let first = g.head_slot(seq, 0, 0) as usize;
            &cache.context_lens[first..first + heads_per_seq as usize]
        })
        .max()
        .map_or(0, |&len| len as u32);
    let Arrays::Cuda(d) = &cache.arrays else {
        return Err(validate::backend_mismatch("cache"));
    };
    let gpu = &d.gpu;
    let plan = plan_compress(
        &g,
        num_work_seqs,
        group_heads,
        max_context_len,
        gpu.props().num_sms,
    );
    let [seq_in_at, seq_out_at, heads_at, groups_at, status_at, hist_at] =
        plan.offsets(num_work_seqs);
    let [key_high_at, key_mid_at, evictable_at] = plan.digest_offsets(num_work_seqs);
    let candidates_at = plan.candidates_offset(num_work_seqs);
    let workspace = gpu.workspace(plan.workspace_bytes(num_work_seqs))?;
    let base = gpu.addr(&workspace);
    let mut params = CompressParams {
        cache: d.view(g),
        seq_in: base + seq_in_at,
        seq_out: base + seq_out_at,
        heads: base + heads_at,
        groups: base + groups_at,
        hist: base + hist_at,
        status: base + status_at,
        key_high: base + key_high_at,
        evictable: base + evictable_at,
        key_mid: base + key_mid_at,
        candidates: base + candidates_at,
        num_work_seqs,
        group_heads,
        sinks: args.sinks,
        pass: 0,
        chunks_per_head: plan.chunks_per_head,
        row_bytes: g.head_dim * cache.dtype().elem_bytes(),
        host_io: 0,
    };
    // The inputs go to host-mapped memory, where `sched_init` reads them and the schedule
    // leaves the host's results (every head slot's and sequence's; `status` only when a
    // budget fails, so it is cleared here).
    let mut io = gpu.host_io(params.io_words() as usize)?;
    let words = io.words_mut();
    for (s, ((&seq, budget), &protected)) in
        (0..).zip(args.seqs.iter().zip(args.budgets).zip(args.protected))
    {
        let (kind, value) = match *budget {
            Budget::Blocks(n) => (BUDGET_BLOCKS, n),
            Budget::Rate(rate) => (BUDGET_RATE, rate.to_bits()),
            Budget::MaxTokens(t) => (BUDGET_TOKENS, t),
        };
        for (field, word) in [
            (SEQ_IN_SEQ, seq),
            (SEQ_IN_BUDGET_KIND, kind),
            (SEQ_IN_BUDGET_VALUE, value),
            (SEQ_IN_PROTECTED, protected),
            (SEQ_IN_LAST_POSITION, cache.last_position(seq) as u32),
        ] {
            words[params.io_seq_in_word(s, field) as usize] = word;
        }
    }
    words[params.io_status_word() as usize] = 0;
    params.host_io = io.device_addr();
    // Timing events only for a timed step (recording them costs the engine), none before the
    // first launch: the first command after an idle spell took the host 7-30 us (PERF
    // compression v16), and a timed step should not pay more of that than the engine does.
    let events = timed.then(|| gpu.timing_events());
    let mark = |i: usize| events.as_ref().map_or(Ok(()), |e| gpu.record(&e[i]));
    // SAFETY: validate::compress checked the sequence rows (distinct, in range), one budget
    // and protected window each, rates >= 1; the tables are valid by construction; the
    // workspace holds the plan's arrays, host_io the inputs; sched_init zeroes the
    // histograms and status before the passes.
    unsafe { gpu.launch(SCHED_INIT_ENTRY, plan.init, &params)? };
    let setup_ms = start.elapsed().as_secs_f64() * 1e3;
    mark(0)?;
    // SAFETY: as above, after sched_init; every kernel from here on waits for the one before
    // it before it reads anything (`wait_for_prior_grid`), so each may be chained.
    unsafe {
        for pass in 0..RADIX_PASSES {
            params.pass = pass;
            let dims = if pass == LISTED_PASS {
                plan.hist_listed
            } else {
                plan.hist
            };
            gpu.launch_chained(SCHED_HIST_ENTRIES[pass as usize], dims, &params)?;
            if pass == 0 {
                gpu.launch_chained(SCHED_BUDGET_ENTRY, plan.budget, &params)?;
            }
            gpu.launch_chained(SCHED_DIGIT_ENTRY, plan.digit, &params)?;
        }
    }
    io.written()?;
    mark(1)?;
    let compact = if plan.compact_narrow {
        COMPACT_NARROW_ENTRY
    } else {
        COMPACT_ENTRY
    };
    // SAFETY: as above, after the schedule's last digit pass; with `status` set it returns.
    unsafe { gpu.launch_chained(compact, plan.compact, &params)? };
    mark(2)?;
    let results = io.wait()?;
    let seq_out = |s: u32, field: u32| results[params.io_seq_out_word(s, field) as usize];
    let head = |w: u32, field: u32| results[params.io_head_word(w, field) as usize];
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
    if results[params.io_status_word() as usize] != 0 {
        // An explicit block budget could not be met: the compaction changed nothing.
        let s = seq_reports
            .iter()
            .zip(args.budgets)
            .find(|(s, b)| s.clamped && matches!(b, Budget::Blocks(_)))
            .map_or(&seq_reports[0], |(s, _)| s);
        return Err(over_budget(s.seq, s.requested_blocks, s.freed_blocks));
    }
    let host_start = std::time::Instant::now();
    report.heads = (0..num_work_seqs * heads_per_seq)
        .map(|w| {
            let (seq, i) = (args.seqs[(w / heads_per_seq) as usize], w % heads_per_seq);
            let blocks = head(w, IO_HEAD_BLOCKS);
            HeadReport {
                head_slot: g.head_slot(seq, i / g.num_kv_heads, i % g.num_kv_heads),
                evicted: if blocks > 0 {
                    head(w, IO_HEAD_EVICTIONS)
                } else {
                    0
                },
                blocks_freed: blocks,
            }
        })
        .collect();
    drop(io);
    release_blocks(
        &g,
        &mut cache.block_tables,
        &mut cache.context_lens,
        &mut cache.allocator,
        &report.heads,
    )?;
    report.seqs = seq_reports;
    let host_ms = host_start.elapsed().as_secs_f64() * 1e3;
    let Some(events) = events else {
        let times = CompressTimes {
            step_ms: start.elapsed().as_secs_f64() * 1e3,
            setup_ms,
            host_ms,
            ..CompressTimes::default()
        };
        return Ok((report, times));
    };
    // The step is over when the compaction is: its end event is polled, so that `step_ms`
    // does not count the host's wake-up after it (a timed step is a measurement; the
    // engine's step returns before the compaction ends).
    gpu.poll(&events[2])?;
    let step_ms = start.elapsed().as_secs_f64() * 1e3;
    let compact_ms = gpu.elapsed_ms(&events[1], &events[2])?;
    // For the report: the compaction left the moves of each head slot in HEAD_BELOW.
    let moves = gpu.read_back(&workspace, heads_at, groups_at)?;
    let heads: Vec<u32> = bytemuck::pod_collect_to_vec(moves.wait()?);
    drop((moves, workspace));
    let moved_kvs = report
        .heads
        .iter()
        .zip(0..)
        .filter(|(h, _)| h.blocks_freed > 0)
        .map(|(_, w)| heads[params.head_word(w, HEAD_BELOW) as usize] as u64)
        .sum();
    let times = CompressTimes {
        step_ms,
        setup_ms,
        schedule_ms: gpu.elapsed_ms(&events[0], &events[1])?,
        compact_ms,
        host_ms,
        moved_kvs,
    };
    Ok((report, times))
}

#[cfg(test)]
mod tests {
    use super::{release_blocks, PARALLEL_RELEASE_BLOCKS};
    use crate::allocator::BlockAllocator;
    use crate::compress::HeadReport;
    use kvc_abi::Geometry;
    use rand::seq::SliceRandom;
    use rand::Rng;

    /// Enough blocks for the threaded path: every head slot's released entries land on the
    /// free list in head-slot order, become -1, and nothing else changes.
    #[test]
    fn threaded_release_matches_the_sequential_order() {
        let mut rng = rand::rng();
        let g = Geometry {
            num_seqs: 4,
            num_layers: 4,
            num_kv_heads: 8,
            group_size: 1,
            head_dim: 64,
            block_size: 16,
            max_blocks_per_head: 16384,
            num_blocks: 4 * 32 * 16384,
        };
        let slots = (g.num_seqs * g.num_layers * g.num_kv_heads) as usize;
        let mb = g.max_blocks_per_head as usize;
        // Every head slot full, blocks shuffled over the pool.
        let mut tables: Vec<i32> = (0..g.num_blocks as i32).collect();
        tables.shuffle(&mut rng);
        let mut lens = vec![(mb * 16) as i32; slots];
        let mut allocator = BlockAllocator::from_in_use(&vec![true; g.num_blocks as usize]);
        // Sequences 2, 0, 3 and 1 compressed (in that order), most head slots freeing blocks.
        let heads: Vec<HeadReport> = [2u64, 0, 3, 1]
            .iter()
            .flat_map(|&seq| (0..32).map(move |i| seq * 32 + i))
            .map(|head_slot| {
                let blocks = if rng.random_bool(0.1) {
                    0
                } else {
                    rng.random_range(8000..16384u32)
                };
                let partial = if blocks > 0 {
                    rng.random_range(0..16)
                } else {
                    0
                };
                HeadReport {
                    head_slot,
                    evicted: blocks * 16 + partial,
                    blocks_freed: blocks,
                }
            })
            .collect();
        let total: usize = heads.iter().map(|h| h.blocks_freed as usize).sum();
        assert!(
            total >= PARALLEL_RELEASE_BLOCKS,
            "the test must take the threaded path"
        );
        let (before_tables, before_lens) = (tables.clone(), lens.clone());
        release_blocks(&g, &mut tables, &mut lens, &mut allocator, &heads).unwrap();
        let mut expected_free = Vec::new();
        let mut expected_tables = before_tables.clone();
        let mut expected_lens = before_lens.clone();
        for h in heads.iter().filter(|h| h.blocks_freed > 0) {
            let hs = h.head_slot as usize;
            let kept = before_lens[hs] as u32 - h.evicted;
            let first = hs * mb + kept.div_ceil(16) as usize;
            let released = first..first + h.blocks_freed as usize;
            expected_free.extend(before_tables[released.clone()].iter().map(|&b| b as u32));
            expected_tables[released].fill(-1);
            expected_lens[hs] = kept as i32;
        }
        assert_eq!(allocator.free_blocks(), &expected_free[..]);
        assert!(tables == expected_tables, "block tables");
        assert_eq!(lens, expected_lens);
    }

    /// A schedule naming a head slot twice, or more blocks than it holds, is refused before
    /// anything changes.
    #[test]
    fn a_bad_schedule_changes_nothing() {
        let g = Geometry {
            num_seqs: 1,
            num_layers: 1,
            num_kv_heads: 2,
            group_size: 1,
            head_dim: 64,
            block_size: 16,
            max_blocks_per_head: 4,
            num_blocks: 8,
        };
        let head = |head_slot, blocks_freed| HeadReport {
            head_slot,
            evicted: blocks_freed * 16,
            blocks_freed,
        };
        for heads in [
            vec![head(0, 1), head(0, 1)],
            vec![head(1, 5)],
            vec![head(2, 1)],
        ] {
            let mut tables: Vec<i32> = (0..8).collect();
            let mut lens = vec![64, 64];
            let mut allocator = BlockAllocator::from_in_use(&[true; 8]);
            assert!(release_blocks(&g, &mut tables, &mut lens, &mut allocator, &heads).is_err());
            assert_eq!(tables, (0..8).collect::<Vec<i32>>());
            assert_eq!(lens, [64, 64]);
            assert_eq!(allocator.num_free(), 0);
        }
    }
}
