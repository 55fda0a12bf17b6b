//! Paged decode attention on tensor cores, for 16-bit caches (SPEC §3; the contract, grid,
//! partitions, merge and recording are those of [`crate::decode`], whose CTA epilogue this
//! shares).
//!
//! Each warp walks steps of [`mma_tiles_per_step`] tiles of [`MMA_TILE_ROWS`] consecutive rows
//! of its CTA's partition. The `G` queries of the group are the rows `m` of two
//! `mma.m16n8k16` products (rows `G..16` are zero): `S = Q K^T` over two `n8` halves of a
//! tile, then `O += P V` with the tile's rows as `k`. This costs a warp about 200 instructions
//! per 16 rows where the scalar kernel (`crate::decode`) needs over a thousand.
//!
//! Memory: the warp copies step `i + 1` into shared memory (`cp.async`, whole rows per
//! instruction, [`kvc_abi::plan::MMA_STAGES`] stages) while it computes on step `i`, so loads never wait
//! behind arithmetic; the block ids of the partition are read into shared memory once, so no
//! copy waits on a table load. Fragments are read from the staged tiles with 16-byte loads
//! ([`MmaTile`] gives the lane-to-element map and the conflict-free swizzle): K rows and the
//! query share a column permutation, V rows are paired into B fragments by byte permutes. Per
//! `docs/PERF.md` (v5), loading K and V straight into registers instead let `ptxas` sink the
//! loads next to their MMAs (serial latency), and 64-byte-per-row loads cost L2 throughput.
//!
//! Accuracy: the product accumulates in f32 from the exact 16-bit inputs. `P` is fed to the
//! second product as `hi + lo`, two 16-bit values (two MMAs), scaled by [`P_SCALE`] so that
//! small probabilities stay out of the 16-bit subnormals: the sum keeps about twice the type's
//! precision, close to the scalar kernel's f32, and the documented tolerances are unchanged.
//! The softmax sum is accumulated from the f32 probabilities.

use kvc_abi::params::DecodeParams;
use kvc_abi::plan::{
    decode_smem, mma_tile_chunks, mma_tiles_per_step, MmaTile, DECODE_WARPS, MMA_TILE_ROWS,
    WARP_SIZE,
};

use crate::decode::{begin, finish, BlockIds, Stash, Work};
use crate::gpu::math::{exp2, fmax, CacheElem};
use crate::gpu::mem::{l2_keep_policy, load_chunk, store_word_kept};
use crate::gpu::mma::{
    commit_async_copies, copy_async_chunk, load_shared_chunk, pair_halves, shared_addr,
    wait_async_copies_but_last, Mma16,
};
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::allow_dependent_grid;
use crate::gpu::thread::{lane_id, warp_id};
use crate::gpu::warp::{shfl_xor, sync_warp};

/// Most 16-byte chunks of a query row one lane loads (`D / 32`, `D <= 256`).
const MAX_K_CHUNKS: usize = 8;
/// Most tiles per step ([`mma_tiles_per_step`]).
const MAX_TILES: usize = 2;
/// Most `n8` output tiles (`D / 8`).
const MAX_OUT_TILES: usize = 32;

/// `P` is scaled by this power of two before it is split into 16-bit `hi + lo` (and the
/// accumulators by its inverse at the end), so that probabilities down to about `2^-24 /
/// P_SCALE` keep their precision in f16.
const P_SCALE: f32 = 1024.0;

/// The tensor-core decode body for 16-bit cache type `T`, head dimension `D` and group size
/// `G <= 8`.
///
/// # Safety
/// As [`crate::decode::decode_body`].
#[inline(always)]
pub unsafe fn decode_mma_body<
    T: CacheElem + Mma16,
    const D: usize,
    const G: usize,
    const RECORD: bool,
>(
    p: &DecodeParams,
) {
    const { assert!(G <= 8 && D.is_multiple_of(64) && D <= 256) };
    allow_dependent_grid();
    let k_chunks = D / 32;
    let v_chunks = D / 64;
    let tiles = mma_tiles_per_step(D as u32) as usize;
    let geom = p.cache.geometry;
    let elem_bytes = T::BYTES as u64;
    let lane = lane_id();
    let warp = warp_id();
    let gid = lane / 4;
    let tig = lane % 4;
    let smem = decode_smem(G as u32, D as u32, T::BYTES);
    let words = dynamic_f32();
    // SAFETY: every thread of the CTA calls this first.
    let work = unsafe { begin::<T, G>(p) };
    let Work {
        kv_head,
        seq,
        start,
        end,
        ..
    } = work;

    // A fragments of the query (row gid; rows gid + 8 are zero): registers 0 and 2 of k16
    // step `2 chunk + t` are words `2 t` and `2 t + 1` of the lane's chunk.
    let mut q = [[0u32; 4]; MAX_K_CHUNKS];
    if (gid as usize) < G {
        let q_elem = p.query_elem(seq, kv_head * G as u32 + gid);
        for c in 0..k_chunks {
            let elem = q_elem + MmaTile::k_elem(lane, c as u32) as u64;
            // SAFETY: q holds [num_seqs, Hq, D]; the chunk lies inside row gid, 16-byte aligned.
            q[c] = unsafe { load_chunk(p.q + elem * elem_bytes) };
        }
    }

    let mut max = f32::NEG_INFINITY;
    let mut sum = 0.0f32;
    let mut acc = [[0.0f32; 2]; MAX_OUT_TILES];
    // SAFETY: every thread of the CTA calls it.
    let blocks = unsafe { BlockIds::load::<T, G>(p, &work) };
    // The element offset of tile row `row`, clamped to the last live row (masked later).
    let row_elem = |row: u32| {
        let row = if row < end { row } else { end - 1 };
        // SAFETY: start <= row < end.
        let block_id = unsafe { blocks.get(geom, row) };
        geom.kv_elem(block_id, geom.slot_in_block(row))
    };
    let step_rows = MMA_TILE_ROWS * tiles as u32;
    let smem_base = shared_addr(words);
    let tile_chunks = mma_tile_chunks(D as u32);
    // Shared address of chunk `chunk` of row `row` of staged tile `tile` of `stage`: the K
    // tiles of the step, then its V tiles.
    let chunk_addr = |stage: u32, tile: usize, row: u32, chunk: u32| {
        let staged = tile as u32 * tile_chunks + MmaTile::staged_chunk(D as u32, row, chunk);
        smem_base + smem.staging_word(D as u32, warp, stage, staged) * 4
    };
    // Starts copying the K and V rows of the step at `step_start` into `stage`, whole rows per
    // copy instruction.
    let stage_step = |step_start: u32, stage: u32| {
        for nt in 0..tiles {
            let tile_start = step_start + nt as u32 * MMA_TILE_ROWS;
            for i in 0..tile_chunks / WARP_SIZE {
                let (row, chunk) = MmaTile::copy_chunk(D as u32, i, lane);
                let elem = row_elem(tile_start + row);
                let byte = (elem + (chunk as usize * T::PER_CHUNK) as u64) * elem_bytes;
                // SAFETY: staged chunks of this warp's stage; a validated pool block, the
                // chunk inside its row, never written during the kernel.
                unsafe {
                    copy_async_chunk(
                        chunk_addr(stage, nt, row, chunk),
                        Some(p.cache.k_pool + byte),
                        0,
                    );
                    copy_async_chunk(
                        chunk_addr(stage, tiles + nt, row, chunk),
                        Some(p.cache.v_pool + byte),
                        0,
                    );
                }
            }
        }
    };

    // The stash stays in L2 until the record phase reads and drops it.
    let keep = l2_keep_policy();
    let stash = Stash::of::<G>(p, &work);
    let stride = DECODE_WARPS * step_rows;
    let mut step_start = start + warp * step_rows;
    let mut stage = 0;
    if step_start < end {
        stage_step(step_start, stage);
    }
    // SAFETY: the lane's own copies.
    unsafe { commit_async_copies() };
    while step_start < end {
        // Copy the next step in while this one is computed, into the stage the warp read
        // last step (every lane is past those reads).
        let next = step_start + stride;
        // SAFETY: every lane of the warp runs the loop the same number of times.
        unsafe { sync_warp() };
        if next < end {
            stage_step(next, stage ^ 1);
        }
        // SAFETY: waits for this step's copies of every lane of the warp.
        unsafe {
            commit_async_copies();
            wait_async_copies_but_last();
            sync_warp();
        }

        // S = Q K^T in the log2 domain; the lane holds rows score_row(lane, half, e) of each
        // tile for query gid.
        let mut score = [[[0.0f32; 2]; 2]; MAX_TILES];
        let mut live = [[[false; 2]; 2]; MAX_TILES];
        for nt in 0..tiles {
            let tile_start = step_start + nt as u32 * MMA_TILE_ROWS;
            for half in 0..2 {
                let mut c = [0.0f32; 4];
                for kc in 0..k_chunks {
                    let row = MmaTile::k_row(lane, half as u32);
                    let chunk = MmaTile::k_elem(lane, kc as u32) / T::PER_CHUNK as u32;
                    // SAFETY: a landed chunk of this step.
                    let kw = unsafe { load_shared_chunk(chunk_addr(stage, nt, row, chunk)) };
                    let qw = q[kc];
                    for t in 0..2 {
                        // SAFETY: the whole warp runs this loop.
                        c = unsafe {
                            T::mma(
                                [qw[2 * t], 0, qw[2 * t + 1], 0],
                                [kw[2 * t], kw[2 * t + 1]],
                                c,
                            )
                        };
                    }
                }
                for e in 0..2 {
                    let row = tile_start + MmaTile::score_row(lane, half as u32, e as u32);
                    live[nt][half][e] = row < end;
                    score[nt][half][e] = c[e] * p.scale_log2;
                    if RECORD && (gid as usize) < G {
                        // Dead rows too (never read back): the stash holds the partition's
                        // every row, and no branch is needed.
                        let at = stash.at(gid, row - start);
                        // SAFETY: row - start < partition_kvs: a word of the plan's stash.
                        unsafe { store_word_kept(at, score[nt][half][e].to_bits(), keep) };
                    }
                }
            }
        }

        // Online softmax of query gid over the step (the 4 lanes of the group share it).
        let mut step_max = f32::NEG_INFINITY;
        for nt in 0..tiles {
            for half in 0..2 {
                for e in 0..2 {
                    if live[nt][half][e] {
                        step_max = fmax(step_max, score[nt][half][e]);
                    }
                }
            }
        }
        // SAFETY: every lane runs these shuffles.
        unsafe {
            step_max = fmax(step_max, shfl_xor(step_max, 1));
            step_max = fmax(step_max, shfl_xor(step_max, 2));
        }
        let new_max = fmax(max, step_max);
        let base = if new_max == f32::NEG_INFINITY {
            0.0
        } else {
            new_max
        };
        let rescale = exp2(max - base);
        max = new_max;
        sum *= rescale;
        for j in 0..D / 8 {
            acc[j][0] *= rescale;
            acc[j][1] *= rescale;
        }

        for nt in 0..tiles {
            let mut prob = [[0.0f32; 2]; 2];
            for half in 0..2 {
                for e in 0..2 {
                    if live[nt][half][e] {
                        prob[half][e] = exp2(score[nt][half][e] - base);
                    }
                    sum += prob[half][e];
                }
            }
            let (a0_hi, a0_lo) = T::split(prob[0][0] * P_SCALE, prob[0][1] * P_SCALE);
            let (a2_hi, a2_lo) = T::split(prob[1][0] * P_SCALE, prob[1][1] * P_SCALE);

            // O += P V: n8 tile (chunk, word, e) takes element e of word `word` of the lane's
            // V chunk, paired over the rows (2 tig, 2 tig + 1) and (2 tig + 8, 2 tig + 9).
            for c in 0..v_chunks {
                let mut rows = [[0u32; 4]; 4];
                for (r, v_row) in rows.iter_mut().enumerate() {
                    let row = MmaTile::v_row(lane, r as u32);
                    let chunk = MmaTile::v_elem(lane, c as u32) / T::PER_CHUNK as u32;
                    // SAFETY: a landed chunk of this step.
                    *v_row =
                        unsafe { load_shared_chunk(chunk_addr(stage, tiles + nt, row, chunk)) };
                }
                for word in 0..4 {
                    for e in 0..2 {
                        let j = (c * 4 + word) * 2 + e;
                        let b0 = pair_halves(rows[0][word], rows[1][word], e == 1);
                        let b1 = pair_halves(rows[2][word], rows[3][word], e == 1);
                        // SAFETY: the whole warp runs this loop.
                        unsafe {
                            let d = T::mma(
                                [a0_hi, 0, a2_hi, 0],
                                [b0, b1],
                                [acc[j][0], acc[j][1], 0.0, 0.0],
                            );
                            let d = T::mma([a0_lo, 0, a2_lo, 0], [b0, b1], [d[0], d[1], 0.0, 0.0]);
                            acc[j] = [d[0], d[1]];
                        }
                    }
                }
            }
        }
        step_start = next;
        stage ^= 1;
    }

    // The group's 4 lanes hold disjoint rows (sum) and columns (acc) of query gid.
    // SAFETY: every lane runs these shuffles.
    unsafe {
        sum += shfl_xor(sum, 1);
        sum += shfl_xor(sum, 2);
    }
    if (gid as usize) < G {
        // SAFETY: the offsets come from decode_smem, whose size the launch reserved.
        unsafe {
            if tig == 0 {
                *words.add(smem.ml_word(G as u32, warp, gid) as usize) = max;
                *words.add(smem.ml_word(G as u32, warp, gid) as usize + 1) = sum;
            }
            for c in 0..v_chunks {
                for word in 0..4 {
                    for e in 0..2 {
                        let j = (c * 4 + word) * 2 + e;
                        for half in 0..2 {
                            let col = MmaTile::out_elem(
                                lane,
                                c as u32,
                                word as u32,
                                e as u32,
                                half as u32,
                            );
                            let at = smem.acc_word(G as u32, D as u32, warp, gid, col);
                            *words.add(at as usize) = acc[j][half] * (1.0 / P_SCALE);
                        }
                    }
                }
            }
        }
    }
    // SAFETY: every thread of the CTA calls it, after its warp's writes.
    unsafe { finish::<T, D, G, RECORD>(p, &work, &blocks) };
}
