//! The compression step (SPEC §5-§7): per-head eviction scheduling under one block budget per
//! sequence, compaction of the retained KVs into the holes, and the return of whole blocks to
//! the allocator.

/// How many blocks a sequence should give back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Exactly this many blocks (rounded down to a multiple of `L` in `PerLayer` mode and of
    /// `L * H` in `Uniform` mode). More than the sequence can free is an error.
    Blocks(u32),
    /// Compression rate `R >= 1`: keep `ceil(compressible / R)` of the compressible KVs (plus
    /// the protected ones), i.e. free `floor((compressible - ceil(compressible / R)) / B)`
    /// blocks. Clamped to what can be freed.
    Rate(f32),
    /// Keep at most `L * H * T` KVs, in whole blocks: free `blocks in use - ceil(L * H * T / B)`
    /// blocks. Clamped to what can be freed.
    MaxTokens(u32),
}

/// How a sequence's budget is spread over its head slots (SPEC §5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// KV-Compress: the cheapest blocks across all `L * H` head slots.
    Variable,
    /// `N / L` blocks chosen within each layer.
    PerLayer,
    /// `N / (L * H)` blocks from every head slot: the fixed-rate baseline.
    Uniform,
}

impl Mode {
    /// Head slots per selection group: `L * H`, `H` or 1.
    pub fn group_heads(self, num_layers: u32, num_kv_heads: u32) -> u32 {
        match self {
            Mode::Variable => num_layers * num_kv_heads,
            Mode::PerLayer => num_kv_heads,
            Mode::Uniform => 1,
        }
    }
}

/// One compression step over some sequence rows.
#[derive(Clone, Copy, Debug)]
pub struct CompressArgs<'a> {
    /// Distinct sequence rows to compress.
    pub seqs: &'a [u32],
    /// One budget per entry of `seqs`.
    pub budgets: &'a [Budget],
    /// One protected window `W` per entry of `seqs`: KVs with position `> last_position - W`
    /// are never evicted.
    pub protected: &'a [u32],
    /// Sinks `S`: KVs with position `< S` are never evicted.
    pub sinks: u32,
    /// How the budget is spread over the head slots.
    pub mode: Mode,
}

/// What one compression step did to one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqReport {
    /// Sequence row.
    pub seq: u32,
    /// Blocks the budget asked for, after the mode's rounding.
    pub requested_blocks: u32,
    /// Blocks freed (`requested_blocks` unless clamped).
    pub freed_blocks: u32,
    /// Whether the budget asked for more than the sequence could free.
    pub clamped: bool,
}

/// What one compression step did to one head slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadReport {
    /// `(seq, layer, kv_head)` as a head-slot index (`Geometry::head_slot`).
    pub head_slot: u64,
    /// KVs evicted.
    pub evicted: u32,
    /// Whole blocks freed.
    pub blocks_freed: u32,
}

/// Where the time of one compression step went (from [`PagedKvCache::compress_timed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompressTimes {
    /// The whole step, wall clock, from the call until the compaction has finished: validation,
    /// launches, the wait for the schedule's results and host work. On CUDA the host work runs
    /// while the device compacts, so this is less than the sum of the parts, and the host
    /// polls for the compaction's end (a busy wait) rather than sleeping until the driver
    /// wakes it; the read-back of the move counts for `moved_kvs` comes after it (a timed
    /// step's report only, not the step).
    pub step_ms: f64,
    /// Host time from the call until the step's first device command is queued (validation,
    /// the launch plan, the inputs, the launch of `sched_init`); on the CPU backend, to the
    /// schedule.
    pub setup_ms: f64,
    /// Scheduling: the radix passes and the budget (device time on CUDA, from the end of
    /// `sched_init`, which copies the inputs and clears the schedule's state).
    pub schedule_ms: f64,
    /// Compaction: each head slot's selection, the hole and mover scans and the moves (device
    /// time on CUDA).
    pub compact_ms: f64,
    /// Updating the host's tables, lengths, report and allocator (on CUDA while the device
    /// compacts; on the CPU backend this is part of `compact_ms`).
    pub host_ms: f64,
    /// KVs moved (each a K row, a V row, a metric and a position).
    pub moved_kvs: u64,
}

/// The outcome of [`crate::PagedKvCache::compress`].
///
/// The physical blocks freed are not copied into the report: the step pushes them onto the
/// allocator's free list, head slot by head slot in the order of `heads`, so right after the
/// call they are the last [`CompressReport::freed_blocks`] entries of
/// [`crate::BlockAllocator::free_blocks`]. A list of its own would cost a fresh page per
/// 1024 ids every step (1.8 M ids at 16 x 8192: 4.6-5.7 ms on a 2-core machine where the same
/// copy into pages touched before took 0.6-1.2 ms, docs/PERF.md compression v7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressReport {
    /// In the order of `CompressArgs::seqs`.
    pub seqs: Vec<SeqReport>,
    /// For every head slot of the compressed sequences, in `(seq, layer, kv_head)` order.
    pub heads: Vec<HeadReport>,
}

impl CompressReport {
    /// Physical blocks the step returned to the allocator.
    pub fn freed_blocks(&self) -> u64 {
        self.seqs.iter().map(|s| s.freed_blocks as u64).sum()
    }
}

use crate::cache::{Arrays, PagedKvCache};
use crate::error::{Error, Result};
use crate::reference::{self, SeqInput, SeqSchedule};
use crate::validate;

impl PagedKvCache {
    /// One compression step (SPEC §7): schedules per-head evictions for `args.seqs` under
    /// their budgets (§5), moves the retained KVs into the holes (§6) and returns whole blocks
    /// to the allocator. An explicit [`Budget::Blocks`] above what a sequence can free is an
    /// error and leaves the cache untouched; rate and token budgets are clamped, and the
    /// report says so.
    ///
    /// On CUDA it returns once the host's tables, lengths and allocator are up to date, with
    /// the compaction possibly still running on the backend's stream: every later launch and
    /// copy on that stream comes after it, as after `decode`.
    pub fn compress(&mut self, args: &CompressArgs) -> Result<CompressReport> {
        Ok(self.compress_step(args, false)?.0)
    }

    /// [`PagedKvCache::compress`], also reporting where the time went; on CUDA it waits for the
    /// compaction (its time and move count are part of the report).
    pub fn compress_timed(
        &mut self,
        args: &CompressArgs,
    ) -> Result<(CompressReport, CompressTimes)> {
        self.compress_step(args, true)
    }

    fn compress_step(
        &mut self,
        args: &CompressArgs,
        timed: bool,
    ) -> Result<(CompressReport, CompressTimes)> {
        let start = std::time::Instant::now();
        validate::compress(self, args)?;
        match &self.arrays {
            Arrays::Host(_) => {
                let setup_ms = start.elapsed().as_secs_f64() * 1e3;
                let (report, times) = self.compress_on_host(args)?;
                let step_ms = start.elapsed().as_secs_f64() * 1e3;
                Ok((
                    report,
                    CompressTimes {
                        step_ms,
                        setup_ms,
                        ..times
                    },
                ))
            }
            Arrays::Cuda(_) => crate::ops::compress::compress(self, args, timed, start),
        }
    }

    fn compress_on_host(&mut self, args: &CompressArgs) -> Result<(CompressReport, CompressTimes)> {
        let start = std::time::Instant::now();
        let g = self.geometry();
        let Arrays::Host(host) = &mut self.arrays else {
            return Err(validate::backend_mismatch("cache"));
        };
        let schedules: Vec<SeqSchedule> = {
            let (view, metric) =
                host.view(g, self.config.dtype, &self.block_tables, &self.context_lens);
            args.seqs
                .iter()
                .zip(args.budgets.iter().zip(args.protected))
                .map(|(&seq, (&budget, &protected))| {
                    let input = SeqInput {
                        seq,
                        budget,
                        protected,
                    };
                    reference::schedule_seq(
                        &view,
                        metric,
                        &input,
                        args.sinks,
                        args.mode,
                        self.last_position[seq as usize],
                    )
                })
                .collect()
        };
        for (s, &seq) in schedules.iter().zip(args.seqs) {
            if s.explicit && s.clamped {
                return Err(over_budget(seq, s.requested, s.taken));
            }
        }
        let mut times = CompressTimes {
            schedule_ms: start.elapsed().as_secs_f64() * 1e3,
            ..CompressTimes::default()
        };
        let start = std::time::Instant::now();
        let mut cache = host.view_mut(
            g,
            self.config.dtype,
            &mut self.block_tables,
            &mut self.context_lens,
        );
        let mut report = CompressReport {
            seqs: Vec::new(),
            heads: Vec::new(),
        };
        for (s, &seq) in schedules.iter().zip(args.seqs) {
            for h in &s.heads {
                report.heads.push(HeadReport {
                    head_slot: h.head_slot,
                    evicted: h.evicted.len() as u32,
                    blocks_freed: h.blocks,
                });
                if h.blocks > 0 {
                    let kept =
                        cache.context_lens[h.head_slot as usize] as u32 - h.evicted.len() as u32;
                    times.moved_kvs += h.evicted.iter().filter(|&&j| j < kept).count() as u64;
                    let freed = reference::compact(&mut cache, h.head_slot, &h.evicted);
                    self.allocator.free_owned(&freed)?;
                }
            }
            report.seqs.push(SeqReport {
                seq,
                requested_blocks: s.requested,
                freed_blocks: s.taken,
                clamped: s.clamped,
            });
        }
        times.compact_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok((report, times))
    }
}

/// The error for an explicit block budget a sequence cannot meet.
pub(crate) fn over_budget(seq: u32, requested: u32, possible: u32) -> Error {
    Error::invalid(
        "budgets",
        format!("Blocks({requested}) for seq {seq}"),
        format!("at most the {possible} blocks its evictable KVs can free (in this mode)"),
    )
}
