//! The host block allocator over the one physical pool (SPEC §2): a free list. Allocation is
//! all-or-nothing; freeing a block that is not allocated is an error, not a corruption.
//!
//! The free list is the allocator's only state. In a cache, which head slot owns each handed-out
//! block is the block tables' business (one owner per block, checked by
//! [`crate::PagedKvCache::verify`]), so the cache gives blocks back unchecked
//! ([`BlockAllocator::free_owned`]): per block one write, no bookkeeping at random addresses.
//! A compression step returns millions of blocks, and a per-block "allocated" bitset cost more
//! host time than the rest of the step's host work (docs/PERF.md).

use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::{Error, Result};

/// Free list over blocks `0..num_blocks`.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    /// Free blocks; the next allocation pops from the end. Its buffer has room for every
    /// block, written once at construction, so that taking back the blocks of a compression
    /// step neither reallocates nor page-faults.
    free: Vec<u32>,
    num_blocks: u32,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free; they are handed out in ascending order.
    pub fn new(num_blocks: u32) -> Self {
        Self::from_in_use(&vec![false; num_blocks as usize])
    }

    /// An allocator whose allocated blocks are exactly those `in_use` marks.
    pub(crate) fn from_in_use(in_use: &[bool]) -> Self {
        // Written, not just reserved (`vec![0; n]` would map zero pages lazily).
        let mut free = Vec::with_capacity(in_use.len());
        free.resize(in_use.len(), u32::MAX);
        free.clear();
        free.extend(
            (0..in_use.len() as u32)
                .rev()
                .filter(|&b| !in_use[b as usize]),
        );
        Self {
            free,
            num_blocks: in_use.len() as u32,
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

    /// The free blocks; the next allocation takes from the end, and blocks given back are
    /// pushed there (a compression step's in head-slot order, see
    /// [`crate::CompressReport`]).
    pub fn free_blocks(&self) -> &[u32] {
        &self.free
    }

    /// Blocks handed out.
    pub fn num_allocated(&self) -> u32 {
        self.num_blocks - self.num_free()
    }

    /// One bit per block of the pool: free. Fails on a block listed twice or outside the pool
    /// (a corrupted free list).
    pub(crate) fn free_set(&self) -> Result<Vec<u64>> {
        let mut set = vec![0u64; (self.num_blocks as usize).div_ceil(64)];
        for &b in &self.free {
            let (word, bit) = (b as usize / 64, 1u64 << (b % 64));
            if b >= self.num_blocks || set[word] & bit != 0 {
                return Err(Error::invalid(
                    "allocator",
                    format!("free block {b}"),
                    format!("free blocks of 0..{}, each listed once", self.num_blocks),
                ));
            }
            set[word] |= bit;
        }
        Ok(set)
    }

    /// Whether `block` is handed out (false for ids outside the pool). Scans the free list:
    /// for checks and tests, not for hot paths.
    pub fn is_allocated(&self, block: u32) -> bool {
        block < self.num_blocks && !self.free.contains(&block)
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
        Ok(self.free.split_off(self.free.len() - n as usize))
    }

    /// Takes `blocks` back. Rejects, changing nothing, an id outside the pool, a block that is
    /// not allocated, or one named twice. Checking costs a pass over the free list and a bit
    /// per pool block; the cache's own returns skip it ([`BlockAllocator::free_owned`]).
    pub fn free(&mut self, blocks: &[u32]) -> Result<()> {
        let num_blocks = self.num_blocks();
        let mut taken = self.free_set()?;
        for &b in blocks {
            let (word, bit) = (b as usize / 64, 1u64 << (b % 64));
            if b >= num_blocks || taken[word] & bit != 0 {
                return Err(Error::invalid(
                    "blocks",
                    b,
                    format!("an allocated block of 0..{num_blocks}, named once"),
                ));
            }
            taken[word] |= bit;
        }
        self.free.extend_from_slice(blocks);
        Ok(())
    }

    /// Takes back blocks the cache's own tables just released: owned by exactly one head slot
    /// each, so allocated and distinct by construction.
    pub(crate) fn free_owned(&mut self, blocks: &[u32]) {
        self.free.extend_from_slice(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::BlockAllocator;
    use rand::Rng;

    #[test]
    fn free_set_marks_free_blocks_and_rejects_a_corrupted_list() {
        let mut rng = rand::rng();
        let num_blocks = rng.random_range(65..300u32);
        // Block 0 free, the rest at random.
        let in_use: Vec<bool> = (0..num_blocks)
            .map(|b| b > 0 && rng.random_bool(0.5))
            .collect();
        let mut alloc = BlockAllocator::from_in_use(&in_use);
        let set = alloc.free_set().unwrap();
        for (b, &used) in in_use.iter().enumerate() {
            assert_eq!(set[b / 64] >> (b % 64) & 1 == 1, !used, "block {b}");
        }
        // A block listed twice, or one outside the pool, is a corrupted free list.
        let mut twice = alloc.clone();
        twice.free.push(alloc.free[0]);
        assert!(twice.free_set().is_err());
        alloc.free.push(num_blocks);
        assert!(alloc.free_set().is_err());
    }
}
