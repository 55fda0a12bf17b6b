//! The host block allocator over the one physical pool (SPEC §2): a free list and an
//! allocated bit per block. Allocation is all-or-nothing; freeing a block that is not
//! allocated is an error, not a corruption.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::{Error, Result};

/// Free list over blocks `0..num_blocks`.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    /// Free blocks; the next allocation pops from the end.
    free: Vec<u32>,
    /// One bit per block: handed out. A bitset (one bit, not one byte, per block) keeps the
    /// random accesses of freeing millions of blocks in cache.
    allocated: Vec<u64>,
    num_blocks: u32,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free; they are handed out in ascending order.
    pub fn new(num_blocks: u32) -> Self {
        Self::from_in_use(vec![false; num_blocks as usize])
    }

    /// An allocator whose allocated blocks are exactly those `in_use` marks.
    pub(crate) fn from_in_use(in_use: Vec<bool>) -> Self {
        let num_blocks = in_use.len() as u32;
        let mut allocated = vec![0u64; in_use.len().div_ceil(64)];
        for (b, _) in in_use.iter().enumerate().filter(|(_, &used)| used) {
            allocated[b / 64] |= 1 << (b % 64);
        }
        let free = (0..num_blocks)
            .rev()
            .filter(|&b| !in_use[b as usize])
            .collect();
        Self {
            free,
            allocated,
            num_blocks,
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    /// Blocks that can be allocated.
    pub fn num_free(&self) -> u32 {
        self.free.len() as u32
    }

    /// Blocks handed out.
    pub fn num_allocated(&self) -> u32 {
        self.num_blocks - self.num_free()
    }

    /// Whether `block` is handed out (false for ids outside the pool).
    pub fn is_allocated(&self, block: u32) -> bool {
        block < self.num_blocks && self.allocated[block as usize / 64] >> (block % 64) & 1 == 1
    }

    fn set_allocated(&mut self, block: u32, allocated: bool) {
        let (word, bit) = (block as usize / 64, block % 64);
        if allocated {
            self.allocated[word] |= 1 << bit;
        } else {
            self.allocated[word] &= !(1 << bit);
        }
    }

    /// Randomises the order in which free blocks are handed out, so that head slots get
    /// scattered blocks (tests, and engines that want to spread traffic).
    pub fn shuffle_free<R: Rng + ?Sized>(&mut self, rng: &mut R) {
        self.free.shuffle(rng);
    }

    /// Hands out `n` blocks, or none with [`Error::OutOfBlocks`].
    pub fn allocate(&mut self, n: u32) -> Result<Vec<u32>> {
        if n > self.num_free() {
            return Err(Error::OutOfBlocks {
                needed: n as u64,
                free: self.num_free() as u64,
            });
        }
        let blocks = self.free.split_off(self.free.len() - n as usize);
        for &b in &blocks {
            self.set_allocated(b, true);
        }
        Ok(blocks)
    }

    /// Takes `blocks` back. Rejects, changing nothing, an id outside the pool, a block that is
    /// not allocated, or one named twice.
    pub fn free(&mut self, blocks: &[u32]) -> Result<()> {
        let num_blocks = self.num_blocks();
        let rejected = |b: u32| {
            Error::invalid(
                "blocks",
                b,
                format!("an allocated block of 0..{num_blocks}, named once"),
            )
        };
        if let Some(&b) = blocks.iter().find(|&&b| !self.is_allocated(b)) {
            return Err(rejected(b));
        }
        // Clearing the allocated bit as we go finds a block named twice; undo on the way out.
        for (i, &b) in blocks.iter().enumerate() {
            if !self.is_allocated(b) {
                for &undo in &blocks[..i] {
                    self.set_allocated(undo, true);
                }
                return Err(rejected(b));
            }
            self.set_allocated(b, false);
        }
        self.free.extend_from_slice(blocks);
        Ok(())
    }

    /// Takes back blocks the cache's own tables just released: owned by exactly one head slot
    /// each, so allocated and distinct by construction (checked only in debug builds).
    pub(crate) fn free_owned(&mut self, blocks: &[u32]) {
        for &b in blocks {
            debug_assert!(self.is_allocated(b), "block {b} released twice");
            self.set_allocated(b, false);
        }
        self.free.extend_from_slice(blocks);
    }
}
