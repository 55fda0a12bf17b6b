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
    /// `buf[..len]` are the free blocks; the next allocation takes from the end. The buffer
    /// holds a word for every block, written once at construction, so that taking back the
    /// blocks of a compression step neither reallocates nor page-faults, and its tail can be
    /// handed out to be written in place ([`BlockAllocator::free_owned_tail`]).
    buf: Vec<u32>,
    len: usize,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free; they are handed out in ascending order.
    pub fn new(num_blocks: u32) -> Self {
        Self::from_in_use(&vec![false; num_blocks as usize])
    }

    /// An allocator whose allocated blocks are exactly those `in_use` marks.
    pub(crate) fn from_in_use(in_use: &[bool]) -> Self {
        // Written, not just reserved (`vec![0; n]` would map zero pages lazily).
        let mut buf = vec![u32::MAX; in_use.len()];
        let mut len = 0;
        for b in (0..in_use.len() as u32)
            .rev()
            .filter(|&b| !in_use[b as usize])
        {
            buf[len] = b;
            len += 1;
        }
        Self { buf, len }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> u32 {
        self.buf.len() as u32
    }

    /// Blocks that can be allocated.
    pub fn num_free(&self) -> u32 {
        self.len as u32
    }

    /// The free blocks; the next allocation takes from the end, and blocks given back are
    /// pushed there (a compression step's in head-slot order, see
    /// [`crate::CompressReport`]).
    pub fn free_blocks(&self) -> &[u32] {
        &self.buf[..self.len]
    }

    /// Blocks handed out.
    pub fn num_allocated(&self) -> u32 {
        self.num_blocks() - self.num_free()
    }

    /// One bit per block of the pool: free. Fails on a block listed twice or outside the pool
    /// (a corrupted free list).
    pub(crate) fn free_set(&self) -> Result<Vec<u64>> {
        let num_blocks = self.num_blocks();
        let mut set = vec![0u64; (num_blocks as usize).div_ceil(64)];
        for &b in self.free_blocks() {
            let (word, bit) = (b as usize / 64, 1u64 << (b % 64));
            if b >= num_blocks || set[word] & bit != 0 {
                return Err(Error::invalid(
                    "allocator",
                    format!("free block {b}"),
                    format!("free blocks of 0..{num_blocks}, each listed once"),
                ));
            }
            set[word] |= bit;
        }
        Ok(set)
    }

    /// Whether `block` is handed out (false for ids outside the pool). Scans the free list:
    /// for checks and tests, not for hot paths.
    pub fn is_allocated(&self, block: u32) -> bool {
        block < self.num_blocks() && !self.free_blocks().contains(&block)
    }

    /// Randomises the order in which free blocks are handed out, so that head slots get
    /// scattered blocks (tests, and engines that want to spread traffic).
    pub fn shuffle_free<R: Rng + ?Sized>(&mut self, rng: &mut R) {
        self.buf[..self.len].shuffle(rng);
    }

    /// Hands out `n` blocks, or none with [`Error::OutOfBlocks`].
    pub fn allocate(&mut self, n: u32) -> Result<Vec<u32>> {
        if n > self.num_free() {
            return Err(Error::OutOfBlocks {
                needed: n as u64,
                free: self.num_free() as u64,
            });
        }
        self.len -= n as usize;
        Ok(self.buf[self.len..self.len + n as usize].to_vec())
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
        // Room: every block named is allocated and named once.
        self.free_owned(blocks)
    }

    /// Takes back blocks the cache's own tables just released: owned by exactly one head slot
    /// each, so allocated and distinct by construction.
    pub(crate) fn free_owned(&mut self, blocks: &[u32]) -> Result<()> {
        self.free_owned_tail(blocks.len())?.copy_from_slice(blocks);
        Ok(())
    }

    /// The free list grown by `n` entries, for the caller to write: `n` blocks the cache's own
    /// tables release (as [`BlockAllocator::free_owned`]), in the order they are to be handed
    /// out again from the end. Fails, changing nothing, if more blocks come back than are
    /// allocated (a corrupted cache).
    pub(crate) fn free_owned_tail(&mut self, n: usize) -> Result<&mut [u32]> {
        let (start, allocated) = (self.len, self.buf.len() - self.len);
        let tail = self.buf.get_mut(start..start + n).ok_or_else(|| {
            Error::invalid(
                "blocks",
                format!("{n} blocks returned with {start} free"),
                format!("at most the {allocated} allocated blocks"),
            )
        })?;
        self.len += n;
        Ok(tail)
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
        twice.buf[twice.len] = alloc.buf[0];
        twice.len += 1;
        assert!(twice.free_set().is_err());
        alloc.buf[alloc.len] = num_blocks;
        alloc.len += 1;
        assert!(alloc.free_set().is_err());
    }
}
