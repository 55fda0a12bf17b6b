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
    /// Whether each block is handed out.
    allocated: Vec<bool>,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free; they are handed out in ascending order.
    pub fn new(num_blocks: u32) -> Self {
        Self {
            free: (0..num_blocks).rev().collect(),
            allocated: vec![false; num_blocks as usize],
        }
    }

    /// An allocator whose allocated blocks are exactly those `in_use` marks.
    pub(crate) fn from_in_use(in_use: Vec<bool>) -> Self {
        let free = (0..in_use.len() as u32)
            .rev()
            .filter(|&b| !in_use[b as usize])
            .collect();
        Self {
            free,
            allocated: in_use,
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> u32 {
        self.allocated.len() as u32
    }

    /// Blocks that can be allocated.
    pub fn num_free(&self) -> u32 {
        self.free.len() as u32
    }

    /// Blocks handed out.
    pub fn num_allocated(&self) -> u32 {
        self.num_blocks() - self.num_free()
    }

    /// Whether `block` is handed out (false for ids outside the pool).
    pub fn is_allocated(&self, block: u32) -> bool {
        self.allocated.get(block as usize).copied().unwrap_or(false)
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
            self.allocated[b as usize] = true;
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
            if !self.allocated[b as usize] {
                for &undo in &blocks[..i] {
                    self.allocated[undo as usize] = true;
                }
                return Err(rejected(b));
            }
            self.allocated[b as usize] = false;
        }
        self.free.extend_from_slice(blocks);
        Ok(())
    }
}
