//! The compression step on the CPU reference (SPEC §5-§7), against properties checked here
//! from the definitions: per-head costs by brute force, optimality of the blocks taken, the
//! prefix property, exact block counts, protected and sink KVs kept, the retained KVs kept
//! bit for bit, and physical memory equal to the theoretical compression.

// Index loops follow SPEC §5's notation (head slot i, block k).
#![allow(clippy::needless_range_loop)]

mod common;

use std::collections::HashMap;

use kvcompress::abi::geometry::metric_key;
use kvcompress::{
    Backend, Budget, CacheConfig, CacheSnapshot, CompressArgs, DType, Error, Mode, PagedKvCache,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A small random cache: per head slot a random length and random distinct positions in a
/// random logical order (as after compaction); metrics drawn from a small set with ties, NaN
/// and infinities.
fn random_cache(
    seed: u64,
    num_seqs: u32,
    layers: u32,
    heads: u32,
    block: u32,
    max_len: u32,
) -> (CacheConfig, CacheSnapshot) {
    let mut rng = StdRng::seed_from_u64(seed);
    let config = CacheConfig {
        num_seqs,
        num_layers: layers,
        num_kv_heads: heads,
        group_size: 1,
        head_dim: 64,
        block_size: block,
        max_blocks_per_head: max_len.div_ceil(block) + 1,
        num_blocks: num_seqs * layers * heads * (max_len.div_ceil(block) + 1),
        dtype: DType::Bf16,
    };
    let g = config.geometry();
    let slots = g.num_head_slots() as usize;
    let lens: Vec<u32> = (0..slots).map(|_| rng.random_range(0..=max_len)).collect();
    let mut snapshot = common::random_snapshot(&config, &lens, &mut rng);
    let palette = [
        0.0f32,
        0.25,
        0.5,
        1.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.75,
    ];
    snapshot.last_position = vec![max_len as i32 + 5; num_seqs as usize];
    for hs in 0..slots {
        let mut positions: Vec<i32> = (0..=max_len as i32 + 5).collect();
        positions.shuffle(&mut rng);
        for j in 0..lens[hs] {
            let block_id = snapshot.block_tables
                [hs * g.max_blocks_per_head as usize + (j / block) as usize]
                as u32;
            let slot = g.pool_slot(block_id, j % block) as usize;
            snapshot.position[slot] = positions[j as usize];
            snapshot.metric[slot] = if rng.random_bool(0.3) {
                palette[rng.random_range(0..palette.len())]
            } else {
                rng.random_range(0.0..1.0)
            };
        }
    }
    (config, snapshot)
}

/// Per head slot: the evictable KVs in eviction order `(key, position, logical)`.
fn evictable(
    config: &CacheConfig,
    s: &CacheSnapshot,
    head_slot: usize,
    sinks: u32,
    last: i32,
    protected: u32,
) -> Vec<(u32, i32, u32)> {
    let (b, mb) = (
        config.block_size as usize,
        config.max_blocks_per_head as usize,
    );
    let mut v: Vec<(u32, i32, u32)> = (0..s.context_lens[head_slot] as usize)
        .filter_map(|j| {
            let slot = s.block_tables[head_slot * mb + j / b] as usize * b + j % b;
            let p = s.position[slot];
            (p >= sinks as i32 && p as i64 <= last as i64 - protected as i64).then_some((
                metric_key(s.metric[slot]),
                p,
                j as u32,
            ))
        })
        .collect();
    v.sort();
    v
}

/// The multiset of `(position, K bytes, V bytes, metric bits)` of a head slot, minus `drop`.
fn contents(
    config: &CacheConfig,
    s: &CacheSnapshot,
    head_slot: usize,
    drop: &[u32],
) -> HashMap<(i32, Vec<u8>, Vec<u8>, u32), u32> {
    let (b, mb) = (
        config.block_size as usize,
        config.max_blocks_per_head as usize,
    );
    let row = 64 * 2;
    let mut m = HashMap::new();
    for j in 0..s.context_lens[head_slot] as usize {
        if drop.contains(&(j as u32)) {
            continue;
        }
        let slot = s.block_tables[head_slot * mb + j / b] as usize * b + j % b;
        let key = (
            s.position[slot],
            s.k_pool[slot * row..][..row].to_vec(),
            s.v_pool[slot * row..][..row].to_vec(),
            s.metric[slot].to_bits(),
        );
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

fn check_step(
    seed: u64,
    mode: Mode,
    budget: Budget,
    protected: u32,
    sinks: u32,
) -> Result<(), TestCaseError> {
    let (config, before) = random_cache(seed, 2, 2, 3, 8, 45);
    let g = config.geometry();
    let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &before).unwrap();
    let args = CompressArgs {
        seqs: &[1, 0],
        budgets: &[budget, budget],
        protected: &[protected, protected],
        sinks,
        mode,
    };
    let free_before = cache.allocator().num_free();
    let result = cache.compress(&args);
    let heads_per_seq = (g.num_layers * g.num_kv_heads) as usize;
    let group = mode.group_heads(g.num_layers, g.num_kv_heads) as usize;
    // Per head slot costs of k = 1, 2, ... blocks, by brute force from the definitions.
    let mut explicit_over = false;
    let mut expected_k: HashMap<usize, u32> = HashMap::new();
    for &seq in &[1usize, 0] {
        let last = before.last_position[seq];
        let first = seq * heads_per_seq;
        let costs: Vec<Vec<u32>> = (first..first + heads_per_seq)
            .map(|hs| {
                let order = evictable(&config, &before, hs, sinks, last, protected);
                let len = before.context_lens[hs] as u32;
                let blocks = len.div_ceil(8);
                (1..=blocks)
                    .map(|k| len - (blocks - 1) * 8 + (k - 1) * 8)
                    .take_while(|&c| c as usize <= order.len())
                    .map(|c| order[c as usize - 1].0)
                    .collect()
            })
            .collect();
        let compressible: usize = (first..first + heads_per_seq)
            .map(|hs| evictable(&config, &before, hs, sinks, last, protected).len())
            .sum();
        let in_use: u32 = (first..first + heads_per_seq)
            .map(|hs| (before.context_lens[hs] as u32).div_ceil(8))
            .sum();
        let wanted = match budget {
            Budget::Blocks(n) => n,
            Budget::Rate(r) => {
                ((compressible - (compressible as f64 / r as f64).ceil() as usize) / 8) as u32
            }
            Budget::MaxTokens(t) => in_use.saturating_sub((heads_per_seq as u32 * t).div_ceil(8)),
        };
        let groups = heads_per_seq / group;
        let per_group = (wanted - wanted % groups as u32) as usize / groups;
        for grp in 0..groups {
            let mut pairs: Vec<(u32, usize, u32)> = Vec::new();
            for i in grp * group..(grp + 1) * group {
                for (k, &c) in costs[i].iter().enumerate() {
                    pairs.push((c, i, k as u32 + 1));
                }
            }
            pairs.sort();
            if pairs.len() < per_group && matches!(budget, Budget::Blocks(_)) {
                explicit_over = true;
            }
            for &(_, i, _) in pairs.iter().take(per_group) {
                *expected_k.entry(first + i).or_insert(0) += 1;
            }
        }
    }
    if explicit_over {
        let rejected = matches!(result, Err(Error::InvalidArgument { arg: "budgets", .. }));
        prop_assert!(rejected, "over-budget explicit blocks accepted");
        common::assert_same_snapshot(&cache.snapshot().unwrap(), &before, "rejected compress");
        return Ok(());
    }
    let report = result.unwrap();
    let after = cache.snapshot().unwrap();
    cache.verify().unwrap();
    // The freed blocks were pushed onto the free list head slot by head slot: the released
    // ends of the tables.
    let max_blocks = g.max_blocks_per_head as usize;
    let released: Vec<u32> = report
        .heads
        .iter()
        .flat_map(|h| {
            let hs = h.head_slot as usize;
            let live = (before.context_lens[hs] as u32).div_ceil(8) as usize;
            let at = hs * max_blocks + live - h.blocks_freed as usize;
            before.block_tables[at..hs * max_blocks + live].iter()
        })
        .map(|&b| b as u32)
        .collect();
    let free = cache.allocator().free_blocks();
    prop_assert_eq!(&free[free_before as usize..], &released[..]);
    prop_assert_eq!(report.freed_blocks(), released.len() as u64);
    for h in &report.heads {
        let hs = h.head_slot as usize;
        let seq = hs / heads_per_seq;
        let k = expected_k.get(&hs).copied().unwrap_or(0);
        prop_assert_eq!(h.blocks_freed, k, "head slot {}: blocks", hs);
        let len = before.context_lens[hs] as u32;
        let order = evictable(
            &config,
            &before,
            hs,
            sinks,
            before.last_position[seq],
            protected,
        );
        let c = if k == 0 {
            0
        } else {
            len - (len.div_ceil(8) - 1) * 8 + (k - 1) * 8
        };
        prop_assert_eq!(h.evicted, c);
        prop_assert_eq!(after.context_lens[hs] as u32, len - c);
        if k > 0 {
            prop_assert_eq!(
                (len - c) % 8,
                0,
                "a compacted head slot ends on a block boundary"
            );
        }
        // The retained KVs, bit for bit (which also keeps every protected and sink KV).
        let dropped: Vec<u32> = order[..c as usize].iter().map(|e| e.2).collect();
        prop_assert_eq!(
            contents(&config, &after, hs, &[]),
            contents(&config, &before, hs, &dropped),
            "head slot {}",
            hs
        );
    }
    let used: u32 = after
        .context_lens
        .iter()
        .map(|&l| (l as u32).div_ceil(8))
        .sum();
    prop_assert_eq!(
        cache.allocator().num_allocated(),
        used,
        "blocks in use = ceil-sum of lengths / B"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn schedule_is_optimal_prefix_closed_and_compaction_keeps_what_it_retains(
        seed in any::<u64>(),
        mode in prop::sample::select(vec![Mode::Variable, Mode::PerLayer, Mode::Uniform]),
        budget in prop_oneof![
            (0u32..40).prop_map(Budget::Blocks),
            (1.0f32..70.0).prop_map(Budget::Rate),
            (0u32..50).prop_map(Budget::MaxTokens),
        ],
        protected in 0u32..20,
        sinks in 0u32..6,
    ) {
        check_step(seed, mode, budget, protected, sinks)?;
    }
}

#[test]
fn physical_compression_equals_theoretical_up_to_one_block_per_head_slot() {
    for rate in [2.0f32, 4.0, 8.0, 16.0, 32.0, 64.0] {
        let lens = vec![4096u32; 2 * 4 * 4];
        let config = common::config_for(DType::F16, 64, 16, 1, 2, 4, 4, &lens, 0);
        let seed = common::fresh_seed();
        let mut snapshot = common::random_snapshot(&config, &lens, &mut common::rng(seed));
        snapshot.last_position = vec![4095, 4095];
        let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
        let kvs_before: u64 = 2 * 16 * 4096;
        let blocks_before = cache.allocator().num_allocated();
        let args = CompressArgs {
            seqs: &[0, 1],
            budgets: &[Budget::Rate(rate); 2],
            protected: &[0, 0],
            sinks: 0,
            mode: Mode::Variable,
        };
        let report = cache.compress(&args).unwrap();
        cache.verify().unwrap();
        let s = cache.snapshot().unwrap();
        let kvs_after: u64 = s.context_lens.iter().map(|&l| l as u64).sum();
        let blocks_after = cache.allocator().num_allocated();
        let exact: u64 = s
            .context_lens
            .iter()
            .map(|&l| (l as u64).div_ceil(16))
            .sum();
        assert_eq!(
            blocks_after as u64, exact,
            "rate {rate}: blocks in use = ceil-sum of lengths / B (seed {seed})"
        );
        let theoretical = kvs_before as f64 / kvs_after as f64;
        let physical = blocks_before as f64 / blocks_after as f64;
        // At most one partly filled block per head slot (32 here) separates the two.
        assert!(
            blocks_after as u64 * 16 < kvs_after + 32 * 16,
            "rate {rate}: {blocks_after} blocks for {kvs_after} KVs"
        );
        assert!(
            theoretical >= rate as f64 * 0.99 && physical >= rate as f64 * 0.99 - 0.05,
            "rate {rate}: theoretical {theoretical:.3}, physical {physical:.3} (seed {seed})"
        );
        assert!(!report.seqs.iter().any(|s| s.clamped));
    }
}
