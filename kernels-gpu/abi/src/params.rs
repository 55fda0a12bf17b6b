//! Launch parameters: one `#[repr(C)]` struct per kernel, passed by value as its only argument.
//! Buffers are `u64` device addresses, so the struct is byte-identical on host and device
//! (checked by `tests/abi_roundtrip.rs` with an echo kernel).

use bytemuck::{Pod, Zeroable};

use crate::geometry::CacheView;

/// Paged decode attention (SPEC §3) and its partition merge: one new query per query head of
/// every sequence row, over the live KVs of head slot `(seq, layer_idx, q_head / G)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct DecodeParams {
    /// The cache read (and, with recording, whose metric is written).
    pub cache: CacheView,
    /// `[num_seqs, Hq, D]`, cache dtype.
    pub q: u64,
    /// `[num_seqs, Hq, D]`, cache dtype.
    pub out: u64,
    /// `[num_seqs, Hq, num_partitions, D]`, f32: each partition's output, weighted by
    /// `exp2(score - partition max)` and not yet divided by the sum. Unused with one partition.
    pub partial_acc: u64,
    /// `[num_seqs, Hq, num_partitions, 2]`, f32: each partition's (max, sum) of
    /// `exp2(score)` in the log2 domain. Unused with one partition.
    pub partial_ml: u64,
    /// Layer whose head slots are read.
    pub layer_idx: u32,
    /// KVs per partition; partition `p` covers logical KVs `[p * partition_kvs, (p + 1) * partition_kvs)`.
    pub partition_kvs: u32,
    /// Partitions per head slot in the grid (the longest head slot's count).
    pub num_partitions: u32,
    /// Softmax scale times log2(e): scores are `scale_log2 * dot(q, k)` in the log2 domain.
    pub scale_log2: f32,
    /// Metric recording (SPEC §3): [`record::OFF`], [`record::L2`] or [`record::L1`].
    pub record: u32,
    /// Padding (keeps the struct free of implicit padding).
    pub reserved: u32,
    /// `[num_seqs]` i32: a KV is recorded iff its position `<= thresholds[seq]`
    /// (`last_position - metric_skip`). Read only when recording.
    pub thresholds: u64,
    /// u32 words, zero at launch: the ticket counter, then one arrival count per
    /// `(seq, kv_head)` (`plan::decode_counter_words`). Used only when recording with more
    /// than one partition; the launch leaves them zero again (its last CTA to take a ticket
    /// resets the ticket word, the last to leave a head slot's handshake its arrival word).
    pub counters: u64,
    /// `[num_seqs, Hq, num_partitions, stash_rows(partition_kvs)]`, f32 (only when
    /// recording): the log2-domain score of each row of a partition for each query head,
    /// written by the partition's CTA while it computes them and read back by its record
    /// phase; 128-byte aligned.
    pub stash: u64,
}

/// f32 words of one 128-byte L2 line: the unit in which the decode drops its score stash.
pub const STASH_LINE_WORDS: u32 = 32;

/// Rows of the decode's score stash per `(seq, q_head, partition)`: `partition_kvs` in whole
/// L2 lines.
pub const fn stash_rows(partition_kvs: u32) -> u32 {
    partition_kvs.next_multiple_of(STASH_LINE_WORDS)
}

/// Values of [`DecodeParams::record`] (and of the window aggregation's metric).
pub mod record {
    /// No recording.
    pub const OFF: u32 = 0;
    /// Add the squared attention probability, summed over the group (the paper's metric).
    pub const L2: u32 = 1;
    /// Add the attention probability, summed over the group.
    pub const L1: u32 = 2;
}

impl DecodeParams {
    /// Row of `(seq, q_head, partition)` in `partial_acc` (times `D`) and `partial_ml` (times 2).
    #[inline(always)]
    pub const fn partial_row(&self, seq: u32, q_head: u32, partition: u32) -> u64 {
        (seq as u64 * self.cache.geometry.num_q_heads() as u64 + q_head as u64)
            * self.num_partitions as u64
            + partition as u64
    }

    /// Word of `stash` holding the score of row `row` (from the partition's start) of
    /// `(seq, q_head, partition)`.
    #[inline(always)]
    pub const fn stash_word(&self, seq: u32, q_head: u32, partition: u32, row: u32) -> u64 {
        self.partial_row(seq, q_head, partition) * stash_rows(self.partition_kvs) as u64
            + row as u64
    }

    /// Words of `stash` between the rows of consecutive query heads (`stash_word` of
    /// `q_head + 1` less that of `q_head`).
    #[inline(always)]
    pub const fn stash_head_words(&self) -> u64 {
        self.num_partitions as u64 * stash_rows(self.partition_kvs) as u64
    }

    /// Partitions holding live KVs of a head slot of `len` KVs.
    #[inline(always)]
    pub fn live_partitions(&self, len: u32) -> u32 {
        len.div_ceil(self.partition_kvs.max(1))
    }

    /// Word of `counters` counting the partitions of head slot `(seq, kv_head)` that finished.
    #[inline(always)]
    pub const fn arrival_word(&self, seq: u32, kv_head: u32) -> u64 {
        1 + seq as u64 * self.cache.geometry.num_kv_heads as u64 + kv_head as u64
    }

    /// Whether CTAs wait for their head slot's other partitions (recording with a split).
    #[inline(always)]
    pub const fn cross_partition(&self) -> bool {
        self.record != record::OFF && self.num_partitions > 1
    }

    /// Element index of query head `q_head` of `seq` in `q` and `out` `[num_seqs, Hq, D]`.
    #[inline(always)]
    pub const fn query_elem(&self, seq: u32, q_head: u32) -> u64 {
        (seq as u64 * self.cache.geometry.num_q_heads() as u64 + q_head as u64)
            * self.cache.geometry.head_dim as u64
    }
}

/// `append_kv` (SPEC §2): scatter new K/V rows to pool slots the host allocated, and apply the
/// host's block-table and length changes, in one launch.
///
/// `meta` is one u32 array: `dest_slot [num_tokens, H]` (pool slots), `position [num_tokens]`,
/// then `patch [num_patches, 2]` pairs `(index, value)`, where an index below
/// `block_table_len()` addresses `block_tables` and the rest `context_lens`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct AppendParams {
    /// The cache written.
    pub cache: CacheView,
    /// `[num_tokens, H, D]`, cache dtype.
    pub k_new: u64,
    /// `[num_tokens, H, D]`, cache dtype.
    pub v_new: u64,
    /// u32 words, laid out as above.
    pub meta: u64,
    /// New tokens in this call, over all sequences.
    pub num_tokens: u32,
    /// `(index, value)` pairs at the end of `meta`.
    pub num_patches: u32,
    /// Bytes of one K or V row, `D * elem_bytes` (a multiple of 16).
    pub row_bytes: u32,
    /// CTAs of the grid that scatter rows; the rest apply patches.
    pub scatter_ctas: u32,
}

impl AppendParams {
    /// Rows `(token, kv_head)` to scatter.
    #[inline(always)]
    pub const fn num_rows(&self) -> u64 {
        self.num_tokens as u64 * self.cache.geometry.num_kv_heads as u64
    }

    /// Word of `meta` holding the pool slot of row `row = token * H + kv_head`.
    #[inline(always)]
    pub const fn dest_slot_word(&self, row: u64) -> u64 {
        row
    }

    /// Word of `meta` holding the position of new token `token`.
    #[inline(always)]
    pub const fn position_word(&self, token: u32) -> u64 {
        self.num_rows() + token as u64
    }

    /// First word of patch pair `i` in `meta`.
    #[inline(always)]
    pub const fn patch_word(&self, i: u32) -> u64 {
        self.num_rows() + self.num_tokens as u64 + 2 * i as u64
    }

    /// Words of `meta` in all.
    #[inline(always)]
    pub const fn meta_words(&self) -> u64 {
        self.patch_word(self.num_patches)
    }
}

/// Observation-window score aggregation (SPEC §4), both passes and the merge between them.
///
/// For sequence row `seq` and KV head `h`, the window's query rows are `r = i * G + g`
/// (`i < window_len`, `g < G`), query `i` being prompt position `last_position -
/// (window_len - 1 - i)`. Pass 1 (`window_stats`) finds each row's softmax max and sum over the
/// keys it may see; pass 2 (`window_scores`) sums each key's probabilities per query head,
/// max-pools them over neighbouring logical keys and adds the group sum to `metric`. Given the
/// rows' log-sum-exp from the prefill's attention (`lse`), pass 2 runs alone and reads it instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct AggregateParams {
    /// The cache read, whose metric is written.
    pub cache: CacheView,
    /// `[num_seqs, window, Hq, D]`, cache dtype.
    pub q: u64,
    /// `[num_seqs, H, window * G, 2]` f32: each row's (max, 1 / sum) in the log2 domain
    /// (max 0 and 1 / sum 0 for a row that sees no key).
    pub stats: u64,
    /// `[num_seqs, H, window * G, key_splits, 2]` f32: per key split, (max, sum).
    pub partials: u64,
    /// `[num_seqs, 3]` i32: window length, last position, metric_skip.
    pub seq_info: u64,
    /// A tensor map (`CUtensorMap`, 128 bytes, 64-byte aligned) over the K pool as a 2-D
    /// tensor `[slots, D]` of 16-bit elements, boxes of 64 elements by `B` rows, 128-byte
    /// swizzle: the warp-specialized passes (`agg_ws_stats`, `agg_ws_scores`) read their key
    /// tiles through it; 0 elsewhere.
    pub k_map: u64,
    /// `[num_seqs, window, Hq]` f32: each window query's natural log-sum-exp of `scale * q . k`
    /// over the keys it sees, supplied by the caller (pass 2 reads it in place of `stats`); 0
    /// when pass 1 computes the stats.
    pub lse: u64,
    /// Layer whose head slots are read and recorded.
    pub layer_idx: u32,
    /// `w`, the second extent of `q`.
    pub window: u32,
    /// Key splits of pass 1 (1: pass 1 writes `stats` itself).
    pub key_splits: u32,
    /// Keys per split of pass 1 (a multiple of the key tile).
    pub split_kvs: u32,
    /// Softmax scale times log2(e).
    pub scale_log2: f32,
    /// [`record::L2`] or [`record::L1`].
    pub record: u32,
    /// Half the max-pool width (`k / 2`; 0 = no pooling).
    pub pool_half: u32,
    /// Keys each pass-2 CTA owns: whole key tiles less `2 SCORE_HALO` (its walk with the halo
    /// is whole tiles), at most `MAX_SCORE_KEYS - 2 SCORE_HALO`.
    pub score_kvs: u32,
}

impl AggregateParams {
    /// Query rows of one `(seq, kv_head)`: `window * G`.
    #[inline(always)]
    pub const fn rows(&self) -> u32 {
        self.window * self.cache.geometry.group_size
    }

    /// Row `row` of `(seq, kv_head)` in `stats` (times 2 for the word).
    #[inline(always)]
    pub const fn stats_row(&self, seq: u32, kv_head: u32, row: u32) -> u64 {
        (seq as u64 * self.cache.geometry.num_kv_heads as u64 + kv_head as u64) * self.rows() as u64
            + row as u64
    }

    /// Row of `(seq, kv_head, row, split)` in `partials` (times 2 for the word).
    #[inline(always)]
    pub const fn partial_row(&self, seq: u32, kv_head: u32, row: u32, split: u32) -> u64 {
        self.stats_row(seq, kv_head, row) * self.key_splits as u64 + split as u64
    }

    /// Element index of window query `i`, query head `q_head` of `seq` in `lse`.
    #[inline(always)]
    pub const fn lse_elem(&self, seq: u32, i: u32, q_head: u32) -> u64 {
        (seq as u64 * self.window as u64 + i as u64) * self.cache.geometry.num_q_heads() as u64
            + q_head as u64
    }

    /// Element index of window query `i`, query head `q_head` of `seq` in `q`.
    #[inline(always)]
    pub const fn query_elem(&self, seq: u32, i: u32, q_head: u32) -> u64 {
        self.lse_elem(seq, i, q_head) * self.cache.geometry.head_dim as u64
    }

    /// Word of `seq_info` holding field `field` (0 window length, 1 last position, 2 skip).
    #[inline(always)]
    pub const fn seq_info_word(&self, seq: u32, field: u32) -> u64 {
        seq as u64 * 3 + field as u64
    }
}

/// The compression step on the GPU (SPEC §5-§7): scheduling passes and compaction.
///
/// Work head slots `w` are the head slots of the sequences being compressed, sequence by
/// sequence in `(layer, kv_head)` order; groups of `group_heads` consecutive work head slots
/// share one block budget (all of a sequence, one layer of it, or one head slot). Every
/// per-item array below is u32 words laid out by the `*_WORD` constants of [`compress`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct CompressParams {
    /// The cache scheduled and compacted.
    pub cache: CacheView,
    /// `[num_work_seqs, compress::SEQ_IN_WORDS]`: sequence row, budget kind and value,
    /// protected window, last position.
    pub seq_in: u64,
    /// `[num_work_seqs, compress::SEQ_OUT_WORDS]`: blocks requested and taken, clamped.
    pub seq_out: u64,
    /// `[W, compress::HEAD_WORDS]`: per work head slot state and result.
    pub heads: u64,
    /// `[num_groups, compress::GROUP_WORDS]`: per group budget and threshold prefix.
    pub groups: u64,
    /// `[compress::RADIX_PASSES, W, compress::RADIX_BINS]`: metric-key histograms, then
    /// `[compress::RADIX_PASSES, num_groups]` tickets of the digit kernels (all
    /// zero at launch; [`CompressParams::hist_word`], [`CompressParams::ticket_word`]), then
    /// `[num_groups, slices, compress::RADIX_BINS]` per-slice partial sums, only when a group
    /// has more than one slice ([`CompressParams::partial_word`]).
    pub hist: u64,
    /// One word: non-zero when an explicit block budget cannot be met (nothing is changed).
    pub status: u64,
    /// `[W, key_stride]` u16: the top 16 bits of each KV's metric key, written by histogram
    /// pass 0 for the later passes, which stream them instead of gathering every metric
    /// through the block tables ([`CompressParams::digest_index`]).
    pub key_high: u64,
    /// `[W, key_stride / 8]` bytes: bit `i % 8` of byte `i / 8` of a head slot's row says
    /// whether its KV `i` is evictable; zero past its length. Written by histogram pass 0.
    pub evictable: u64,
    /// `[W, key_stride]` bytes: bits 16-23 of each KV's metric key (the byte below its high
    /// key), written by histogram pass 0; with the high key they give the digit of pass 2 and
    /// of the compaction select's level 16, which then read no metric.
    pub key_mid: u64,
    /// `[W * chunks_per_head, compress::CANDIDATE_WORDS]` u32: per histogram chunk, the count
    /// of histogram pass 2's candidates (evictable KVs whose high key is the group's 16-bit
    /// prefix), then an entry for each of the first `compress::CANDIDATE_WORDS - 1` (its index
    /// in the chunk, the key byte below the high key at bit 16), which pass 3 reads instead of
    /// the chunk when they all fit ([`CompressParams::candidate_word`]). Nothing reads the
    /// lists after pass 3: the last digit pass then keeps each work head slot's cumulative
    /// counts in the row of its chunk 0 ([`CompressParams::cum_word`]).
    pub candidates: u64,
    /// Sequences being compressed.
    pub num_work_seqs: u32,
    /// Work head slots per group.
    pub group_heads: u32,
    /// Sinks `S`.
    pub sinks: u32,
    /// Radix pass of the current launch (histogram and digit kernels).
    pub pass: u32,
    /// Histogram CTAs per work head slot, [`crate::plan::HIST_CHUNK_KVS`] KVs each.
    pub chunks_per_head: u32,
    /// Bytes of one K or V row, `D * elem_bytes`.
    pub row_bytes: u32,
    /// Device address of host-mapped memory shared with the host ([`CompressParams::io_words`]
    /// words): the step's inputs, which `sched_init` copies to `seq_in`, and the words the
    /// host needs back, which the schedule's kernels write there themselves, so that no copy
    /// runs between the schedule and the compaction.
    pub host_io: u64,
}

impl CompressParams {
    /// Head slots per sequence, `L * H`.
    #[inline(always)]
    pub const fn heads_per_seq(&self) -> u32 {
        self.cache.geometry.num_layers * self.cache.geometry.num_kv_heads
    }

    /// The cache head slot of work head slot `w`, given its sequence row.
    #[inline(always)]
    pub const fn head_slot(&self, seq: u32, w: u32) -> u64 {
        seq as u64 * self.heads_per_seq() as u64
            + (w % if self.heads_per_seq() == 0 {
                1
            } else {
                self.heads_per_seq()
            }) as u64
    }

    /// KVs of a work head slot's row in `key_high` and `evictable`: the histogram chunks of
    /// the longest head slot, a multiple of 8 (16-byte rows of high keys, whole flag bytes).
    #[inline(always)]
    pub const fn key_stride(&self) -> u64 {
        compress::key_stride(self.chunks_per_head)
    }

    /// Index of logical KV `i` of work head slot `w` in `key_high` (u16 elements) and, over
    /// 8, in `evictable` (bytes).
    #[inline(always)]
    pub const fn digest_index(&self, w: u32, i: u32) -> u64 {
        w as u64 * self.key_stride() + i as u64
    }

    /// Word `i` of chunk `chunk` of work head slot `w` in `candidates`: 0 the count, from 1
    /// the entries.
    #[inline(always)]
    pub const fn candidate_word(&self, w: u32, chunk: u32, i: u32) -> u64 {
        (w as u64 * self.chunks_per_head as u64 + chunk as u64) * compress::CANDIDATE_WORDS as u64
            + i as u64
    }

    /// Word `bin` of work head slot `w`'s cumulative counts in `candidates` (the row of its
    /// chunk 0, free after histogram pass 3): its evictable KVs whose key lies at or below the
    /// end of bin `bin` of the last pass, under the group's prefix of that pass.
    #[inline(always)]
    pub const fn cum_word(&self, w: u32, bin: u32) -> u64 {
        self.candidate_word(w, 0, bin)
    }

    /// Word `field` of work head slot `w` in `heads`.
    #[inline(always)]
    pub const fn head_word(&self, w: u32, field: u32) -> u64 {
        w as u64 * compress::HEAD_WORDS as u64 + field as u64
    }

    /// Word `field` of group `q` in `groups`.
    #[inline(always)]
    pub const fn group_word(&self, q: u32, field: u32) -> u64 {
        q as u64 * compress::GROUP_WORDS as u64 + field as u64
    }

    /// Word `field` of work sequence `s` in `seq_in`.
    #[inline(always)]
    pub const fn seq_in_word(&self, s: u32, field: u32) -> u64 {
        s as u64 * compress::SEQ_IN_WORDS as u64 + field as u64
    }

    /// Word `field` of work sequence `s` in `seq_out`.
    #[inline(always)]
    pub const fn seq_out_word(&self, s: u32, field: u32) -> u64 {
        s as u64 * compress::SEQ_OUT_WORDS as u64 + field as u64
    }

    /// Word `field` of work sequence `s`'s inputs in `host_io` (the layout of `seq_in`).
    #[inline(always)]
    pub const fn io_seq_in_word(&self, s: u32, field: u32) -> u64 {
        self.seq_in_word(s, field)
    }

    /// The word of `host_io` the budget kernel sets, as `status`, when an explicit block
    /// budget cannot be met; the host's outputs start here.
    #[inline(always)]
    pub const fn io_status_word(&self) -> u64 {
        self.num_work_seqs as u64 * compress::SEQ_IN_WORDS as u64
    }

    /// Word `field` of work sequence `s`'s report in `host_io` (the layout of `seq_out`).
    #[inline(always)]
    pub const fn io_seq_out_word(&self, s: u32, field: u32) -> u64 {
        self.io_status_word() + 1 + self.seq_out_word(s, field)
    }

    /// Word `field` (`compress::IO_HEAD_BLOCKS` or `IO_HEAD_EVICTIONS`) of work head slot
    /// `w`'s result in `host_io`.
    #[inline(always)]
    pub const fn io_head_word(&self, w: u32, field: u32) -> u64 {
        self.io_seq_out_word(self.num_work_seqs, 0)
            + w as u64 * compress::IO_HEAD_WORDS as u64
            + field as u64
    }

    /// Words of `host_io`.
    #[inline(always)]
    pub const fn io_words(&self) -> u64 {
        self.io_head_word(self.num_work_heads(), 0)
    }

    /// Words from `hist` that must be zero when the schedule starts: the histograms and the
    /// tickets.
    #[inline(always)]
    pub const fn hist_clear_words(&self) -> u64 {
        compress::tickets_end(self.num_work_heads(), self.num_groups())
    }

    /// Word of bin `bin` of work head slot `w` in the histogram of `pass`.
    #[inline(always)]
    pub const fn hist_word(&self, num_work_heads: u32, pass: u32, w: u32, bin: u32) -> u64 {
        (pass as u64 * num_work_heads as u64 + w as u64) * compress::RADIX_BINS as u64 + bin as u64
    }

    /// Work head slots being compressed, `W`.
    #[inline(always)]
    pub const fn num_work_heads(&self) -> u32 {
        self.num_work_seqs * self.heads_per_seq()
    }

    /// Selection groups.
    #[inline(always)]
    pub const fn num_groups(&self) -> u32 {
        self.num_work_heads()
            / if self.group_heads == 0 {
                1
            } else {
                self.group_heads
            }
    }

    /// CTAs of the digit kernel per group, [`compress::SLICE_HEADS`] head slots
    /// each.
    #[inline(always)]
    pub const fn slices_per_group(&self) -> u32 {
        compress::slices(self.group_heads)
    }

    /// Word (from `hist`) of group `q`'s ticket in the digit kernel of `pass`.
    #[inline(always)]
    pub const fn ticket_word(&self, pass: u32, q: u32) -> u64 {
        compress::tickets_at(self.num_work_heads())
            + pass as u64 * self.num_groups() as u64
            + q as u64
    }

    /// Word (from `hist`) of bin `bin` of slice `slice` of group `q` in the partial sums (16-
    /// byte aligned rows).
    #[inline(always)]
    pub const fn partial_word(&self, q: u32, slice: u32, bin: u32) -> u64 {
        compress::partials_at(self.num_work_heads(), self.num_groups())
            + (q as u64 * self.slices_per_group() as u64 + slice as u64)
                * compress::RADIX_BINS as u64
            + bin as u64
    }
}

/// Word layouts and codes of [`CompressParams`].
pub mod compress {
    /// Radix select over 32-bit metric keys: 4 passes of 8 bits.
    pub const RADIX_PASSES: u32 = 4;
    /// The last pass, which reads the candidate lists the pass before wrote (`sched_hist3`,
    /// with CTAs of `plan::LISTED_THREADS`).
    pub const LISTED_PASS: u32 = RADIX_PASSES - 1;
    /// Bins of one radix pass.
    pub const RADIX_BINS: u32 = 256;
    /// Words of a histogram chunk's row in `candidates`: the count and up to 255 entries (about
    /// one KV in 16 of a chunk; past that, pass 3 reads the chunk itself).
    pub const CANDIDATE_WORDS: u32 = 256;

    /// `seq_in` words.
    pub const SEQ_IN_WORDS: u32 = 5;
    /// Sequence row.
    pub const SEQ_IN_SEQ: u32 = 0;
    /// One of `BUDGET_BLOCKS`, `BUDGET_RATE`, `BUDGET_TOKENS`.
    pub const SEQ_IN_BUDGET_KIND: u32 = 1;
    /// Blocks, tokens, or the f32 bits of a rate.
    pub const SEQ_IN_BUDGET_VALUE: u32 = 2;
    /// Protected window `W`.
    pub const SEQ_IN_PROTECTED: u32 = 3;
    /// i32 bits.
    pub const SEQ_IN_LAST_POSITION: u32 = 4;

    /// An exact block count.
    pub const BUDGET_BLOCKS: u32 = 0;
    /// A compression rate.
    pub const BUDGET_RATE: u32 = 1;
    /// A token count per head slot.
    pub const BUDGET_TOKENS: u32 = 2;

    /// `seq_out` words.
    pub const SEQ_OUT_WORDS: u32 = 3;
    /// Blocks the budget asked for, after the mode's rounding.
    pub const SEQ_OUT_REQUESTED: u32 = 0;
    /// Blocks freed.
    pub const SEQ_OUT_TAKEN: u32 = 1;
    /// 1 when a rate or token budget was clamped.
    pub const SEQ_OUT_CLAMPED: u32 = 2;

    /// `heads` words.
    pub const HEAD_WORDS: u32 = 6;
    /// Live KVs `n`.
    pub const HEAD_LEN: u32 = 0;
    /// Fill of the last block `r` (0 when empty).
    pub const HEAD_FILL: u32 = 1;
    /// Evictable KVs `m`.
    pub const HEAD_EVICTABLE: u32 = 2;
    /// During scheduling, after the digit kernel of pass `p`: evictable KVs whose key's top
    /// `8 p` bits lie below the group's prefix of pass `p` (the digit kernel of `p + 1` adds
    /// the bins below the digit chosen last). After compaction: the KVs moved.
    pub const HEAD_BELOW: u32 = 3;
    /// Blocks to free `k_h` (in the last digit pass, until the ties are shared out: the
    /// blocks below the threshold).
    pub const HEAD_BLOCKS: u32 = 4;
    /// KVs to evict `c_h` (in the last digit pass, until the ties are shared out: the blocks
    /// at or below the threshold).
    pub const HEAD_EVICTIONS: u32 = 5;

    /// Words of a work head slot's result in `host_io`.
    pub const IO_HEAD_WORDS: u32 = 2;
    /// Blocks to free `k_h` (`HEAD_BLOCKS` once final).
    pub const IO_HEAD_BLOCKS: u32 = 0;
    /// KVs to evict `c_h` (`HEAD_EVICTIONS` once final).
    pub const IO_HEAD_EVICTIONS: u32 = 1;

    /// `groups` words.
    pub const GROUP_WORDS: u32 = 2;
    /// The metric-key bits of the threshold fixed so far.
    pub const GROUP_PREFIX: u32 = 0;
    /// Blocks the group gives (its share of the budget, clamped to what it can free).
    pub const GROUP_NEED: u32 = 1;

    /// Head slots one CTA of the digit kernel takes (a warp each).
    pub const SLICE_HEADS: u32 = 16;

    /// KVs of a work head slot's row in the key digests, for `chunks_per_head` histogram
    /// chunks ([`super::CompressParams::key_stride`]).
    #[inline(always)]
    pub const fn key_stride(chunks_per_head: u32) -> u64 {
        chunks_per_head as u64 * crate::plan::HIST_CHUNK_KVS as u64
    }

    /// Word (from `hist`) where the digit tickets start: after the histograms of `W`
    /// head slots.
    #[inline(always)]
    pub const fn tickets_at(num_work_heads: u32) -> u64 {
        RADIX_PASSES as u64 * num_work_heads as u64 * RADIX_BINS as u64
    }

    /// Word (from `hist`) where the tickets of `num_groups` groups end: what must be zero at
    /// launch.
    #[inline(always)]
    pub const fn tickets_end(num_work_heads: u32, num_groups: u32) -> u64 {
        tickets_at(num_work_heads) + RADIX_PASSES as u64 * num_groups as u64
    }

    /// Word (from `hist`) where the digit partial sums start, 16-byte aligned.
    #[inline(always)]
    pub const fn partials_at(num_work_heads: u32, num_groups: u32) -> u64 {
        tickets_end(num_work_heads, num_groups).next_multiple_of(4)
    }

    /// Words of the digit partial sums (none when a group is one slice).
    #[inline(always)]
    pub const fn partial_words(num_groups: u32, slices: u32) -> u64 {
        if slices > 1 {
            num_groups as u64 * slices as u64 * RADIX_BINS as u64
        } else {
            0
        }
    }

    /// Slices of a group of `group_heads` head slots.
    #[inline(always)]
    pub const fn slices(group_heads: u32) -> u32 {
        if group_heads == 0 {
            1
        } else {
            group_heads.div_ceil(SLICE_HEADS)
        }
    }

    /// Blocks freed from a head slot with fill `fill` when `count` of its evictable KVs may
    /// go: `k` with `fill + (k - 1) * block_size <= count` (`block_size` a power of two).
    #[inline(always)]
    pub const fn blocks_within(count: u32, fill: u32, block_size: u32) -> u32 {
        if fill == 0 || count < fill {
            0
        } else {
            ((count - fill) >> block_size.trailing_zeros()) + 1
        }
    }

    /// KVs evicted to free `blocks` blocks of a head slot with fill `fill`.
    #[inline(always)]
    pub const fn evictions(blocks: u32, fill: u32, block_size: u32) -> u32 {
        if blocks == 0 {
            0
        } else {
            fill + (blocks - 1) * block_size
        }
    }

    /// Fill of the last block of a head slot of `len` KVs, 1 to `block_size` (0 when empty;
    /// `block_size` a power of two).
    #[inline(always)]
    pub const fn fill(len: u32, block_size: u32) -> u32 {
        if len == 0 {
            0
        } else {
            ((len - 1) & (block_size - 1)) + 1
        }
    }

    /// The positions a step may evict from a sequence, `[sinks, last_position - protected]`
    /// (SPEC §5), kept as `count` positions from `first` in the order-preserving unsigned form
    /// of a position (`position ^ 0x8000_0000`), so that a test is one subtraction and one
    /// compare.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EvictableWindow {
        first: u32,
        count: u32,
    }

    impl EvictableWindow {
        /// The window of a sequence whose newest position is `last_position`.
        #[inline(always)]
        pub fn new(sinks: u32, last_position: i32, protected: u32) -> Self {
            let lo = sinks as i64;
            let hi = (last_position as i64 - protected as i64).min(i32::MAX as i64);
            // lo >= 0 and hi <= i32::MAX: at most 2^31 positions; none when empty.
            let count = if hi >= lo { (hi - lo + 1) as u32 } else { 0 };
            EvictableWindow {
                first: biased(lo.min(i32::MAX as i64) as i32),
                count,
            }
        }

        /// Whether `position` lies in the window. Its distance from `first` (wrapping) is
        /// below `count` exactly then: `first + count - 1` does not wrap, so a position
        /// below `first` wraps to at least `count`.
        #[inline(always)]
        pub const fn contains(self, position: i32) -> bool {
            biased(position).wrapping_sub(self.first) < self.count
        }
    }

    /// The metric keys a histogram pass wants: those whose top `bits` bits are the group's
    /// `prefix` (every key when `bits` is 0), as one mask and compare per key.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct KeyFilter {
        mask: u32,
        value: u32,
    }

    impl KeyFilter {
        /// The filter of the `bits`-bit (at most 32) `prefix`.
        #[inline(always)]
        pub fn new(prefix: u32, bits: u32) -> KeyFilter {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            KeyFilter {
                mask,
                value: (prefix << ((32 - bits) & 31)) & mask,
            }
        }

        /// Whether the top bits of `key` are the prefix.
        #[inline(always)]
        pub fn wants(self, key: u32) -> bool {
            key & self.mask == self.value
        }
    }

    /// `position` mapped to `u32` in the same order.
    #[inline(always)]
    const fn biased(position: i32) -> u32 {
        position as u32 ^ 0x8000_0000
    }

    #[cfg(test)]
    mod tests {
        use super::{EvictableWindow, KeyFilter};

        /// A key passes exactly when its top `bits` bits are the prefix, at every pass's width.
        #[test]
        fn key_filter_wants_the_keys_under_its_prefix() {
            let keys = [
                0u32,
                1,
                0xff,
                0x0100,
                0x7fff_ffff,
                0x8000_0000,
                0xdead_beef,
                u32::MAX,
            ];
            for bits in [0u32, 8, 16, 24, 31, 32] {
                for &key in &keys {
                    for &other in &keys {
                        let prefix = if bits == 0 { 0 } else { other >> (32 - bits) };
                        let filter = KeyFilter::new(prefix, bits);
                        let literal = bits == 0 || key >> (32 - bits) == prefix;
                        assert_eq!(
                            filter.wants(key),
                            literal,
                            "{key:#x} under {prefix:#x}/{bits}"
                        );
                    }
                }
            }
        }

        /// Against SPEC §5 read literally (i64 bounds), at the edges of every argument.
        #[test]
        fn evictable_window_matches_the_literal_bounds() {
            let sinks = [
                0u32,
                1,
                4,
                1000,
                i32::MAX as u32,
                i32::MAX as u32 + 1,
                u32::MAX,
            ];
            let last = [i32::MIN, -1, 0, 3, 999, 1000, 5000, i32::MAX - 1, i32::MAX];
            let protected = [0u32, 1, 7, 4000, i32::MAX as u32, u32::MAX];
            let positions = [
                i32::MIN,
                i32::MIN + 1,
                -5,
                -1,
                0,
                1,
                3,
                4,
                999,
                1000,
                1001,
                4999,
                5000,
                i32::MAX - 1,
                i32::MAX,
            ];
            for &s in &sinks {
                for &l in &last {
                    for &w in &protected {
                        let window = EvictableWindow::new(s, l, w);
                        for &p in &positions {
                            let literal = p as i64 >= s as i64 && p as i64 <= l as i64 - w as i64;
                            assert_eq!(
                                window.contains(p),
                                literal,
                                "sinks {s}, last {l}, protected {w}, position {p}"
                            );
                        }
                    }
                }
            }
        }
    }
}
