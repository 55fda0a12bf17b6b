//! The cache on the CPU reference backend (SPEC §2): allocator invariants and `append_kv`
//! against a model that just remembers what was appended to each head slot. Property tests
//! over random operation sequences.

use std::collections::HashSet;

use kvcompress::{Backend, BlockAllocator, CacheConfig, DType, Error, PagedKvCache, Tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Allocate(u32),
    /// Free the allocated blocks whose index in the allocated list is `pick % len`, `count` of them.
    Free {
        pick: usize,
        count: usize,
    },
    DoubleFree(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..20).prop_map(Op::Allocate),
        (any::<usize>(), 0usize..10).prop_map(|(pick, count)| Op::Free { pick, count }),
        any::<usize>().prop_map(Op::DoubleFree),
    ]
}

proptest! {
    #[test]
    fn allocator_never_leaks_or_double_hands_out(num_blocks in 1u32..64, ops in prop::collection::vec(op(), 1..60)) {
        let mut alloc = BlockAllocator::new(num_blocks);
        let mut held: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                Op::Allocate(n) => match alloc.allocate(n) {
                    Ok(blocks) => {
                        prop_assert_eq!(blocks.len() as u32, n);
                        for b in blocks {
                            prop_assert!(b < num_blocks);
                            prop_assert!(!held.contains(&b), "block {} handed out twice", b);
                            held.push(b);
                        }
                    }
                    Err(Error::OutOfBlocks { needed, free }) => {
                        prop_assert_eq!(needed, n as u64);
                        prop_assert_eq!(free, (num_blocks as usize - held.len()) as u64);
                        prop_assert!(n as usize > num_blocks as usize - held.len());
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                },
                Op::Free { pick, count } => {
                    if held.is_empty() { continue; }
                    let mut freed = Vec::new();
                    for i in 0..count.min(held.len()) {
                        freed.push(held.remove((pick + i) % held.len()));
                    }
                    alloc.free(&freed).unwrap();
                }
                Op::DoubleFree(pick) => {
                    let free_before = alloc.num_free();
                    // A block that is free (if any), or one named twice.
                    let victim = (0..num_blocks).find(|b| !held.contains(b));
                    let result = match victim {
                        Some(b) => alloc.free(&[b]),
                        None => { let b = held[pick % held.len()]; alloc.free(&[b, b]) }
                    };
                    let rejected = matches!(result, Err(Error::InvalidArgument { arg: "blocks", .. }));
                    prop_assert!(rejected);
                    prop_assert_eq!(alloc.num_free(), free_before);
                }
            }
            prop_assert_eq!(alloc.num_allocated() as usize, held.len());
            for b in 0..num_blocks {
                prop_assert_eq!(alloc.is_allocated(b), held.contains(&b));
            }
        }
        // Everything free can be handed out once more, each block once.
        let rest = alloc.allocate(alloc.num_free()).unwrap();
        let all: HashSet<u32> = rest.iter().chain(&held).copied().collect();
        prop_assert_eq!(all.len() as u32, num_blocks);
    }

    #[test]
    fn append_writes_next_logical_slots_and_allocates_whole_blocks(
        block_size in prop::sample::select(vec![8u32, 16, 32]),
        chunks in prop::collection::vec(prop::collection::vec(0u32..40, 2), 1..8),
        seed in any::<u64>(),
    ) {
        let config = CacheConfig {
            num_seqs: 2, num_layers: 2, num_kv_heads: 2, group_size: 1, head_dim: 64,
            block_size, max_blocks_per_head: 64, num_blocks: 4 * 2 * 64, dtype: DType::Bf16,
        };
        let backend = Backend::Cpu;
        let mut cache = PagedKvCache::new(&backend, config).unwrap();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        cache.shuffle_free_blocks(&mut rng);
        // model[seq][layer][head] = appended (position, first element of K) in order.
        let mut model = vec![vec![vec![Vec::<(i32, u16)>::new(); 2]; 2]; 2];
        let mut next_position = [0i32; 2];
        let mut tag = 1u16;
        for counts in chunks {
            for layer in 0..2u32 {
                let tokens: u32 = counts.iter().sum();
                let mut k = vec![0u8; tokens as usize * 2 * 64 * 2];
                let mut positions = Vec::new();
                let mut row = 0usize;
                for (seq, &n) in counts.iter().enumerate() {
                    for t in 0..n {
                        positions.push(next_position[seq] + t as i32);
                        for head in 0..2usize {
                            // A distinct bf16 bit pattern per row (tag), as K's first element.
                            k[(row * 2 + head) * 128..][..2].copy_from_slice(&tag.to_le_bytes());
                            model[seq][layer as usize][head].push((next_position[seq] + t as i32, tag));
                            tag = tag.wrapping_add(1) & 0x3fff | 1;
                        }
                        row += 1;
                    }
                }
                let kt = Tensor::from_bytes(&backend, DType::Bf16, &[tokens as usize, 2, 64], &k).unwrap();
                cache.append_kv(layer, &kt, &kt, &positions, &counts).unwrap();
            }
            for (seq, &n) in counts.iter().enumerate() {
                next_position[seq] += n as i32;
            }
        }
        let s = cache.snapshot().unwrap();
        let g = cache.geometry();
        let mut used = HashSet::new();
        let mut blocks_needed = 0;
        for seq in 0..2u32 {
            prop_assert_eq!(cache.last_position(seq), next_position[seq as usize] - 1);
            for layer in 0..2u32 {
                for head in 0..2u32 {
                    let expected = &model[seq as usize][layer as usize][head as usize];
                    prop_assert_eq!(cache.context_len(seq, layer, head) as usize, expected.len());
                    let blocks = cache.blocks_of(seq, layer, head);
                    prop_assert_eq!(blocks.len() as u32, g.blocks_for(expected.len() as u32));
                    blocks_needed += blocks.len();
                    for &b in blocks {
                        prop_assert!(used.insert(b), "block {} owned twice", b);
                    }
                    for (i, &(position, tag)) in expected.iter().enumerate() {
                        let block = blocks[i / block_size as usize] as u32;
                        let slot = g.pool_slot(block, i as u32 % block_size) as usize;
                        prop_assert_eq!(s.position[slot], position);
                        prop_assert_eq!(s.metric[slot], 0.0);
                        let first = slot * 64 * 2;
                        prop_assert_eq!(u16::from_le_bytes([s.k_pool[first], s.k_pool[first + 1]]), tag);
                        prop_assert_eq!(u16::from_le_bytes([s.v_pool[first], s.v_pool[first + 1]]), tag);
                    }
                }
            }
        }
        prop_assert_eq!(cache.allocator().num_allocated() as usize, blocks_needed);
        let freed = cache.free_sequence(0).unwrap();
        prop_assert_eq!(cache.allocator().num_allocated() as usize, blocks_needed - freed as usize);
        prop_assert_eq!(cache.context_len(0, 1, 1), 0);
    }
}
