//! The paged cache as the model sees it: one sequence's block table in a shared pool, for one forward pass.

use super::{BlockPool, BlockTable};
use crate::backend;
use crate::model::llm::{BatchKvStore, KvStore};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// A `KvStore` over `table` in `pool` for a pass over `tokens` (the ids of the pass's positions, image
/// placeholders included; they key the prefix cache). Made per pass because the pool is shared by every
/// sequence. A pass that does not reach `commit` (an error in some layer) is rolled back when this is
/// dropped: its reserved slots hold nothing valid, so the table returns to its old length.
pub struct PagedKv<'a> {
    pool: &'a mut BlockPool,
    table: &'a mut BlockTable,
    tokens: &'a [u32],
    start: usize,
    /// The partially filled last block before the pass (see `BlockPool::rollback`).
    partial: Option<(usize, u32)>,
    committed: bool,
}

impl<'a> PagedKv<'a> {
    pub fn new(pool: &'a mut BlockPool, table: &'a mut BlockTable, tokens: &'a [u32]) -> PagedKv<'a> {
        let start = table.len();
        let partial = pool.partial_last(table);
        PagedKv { pool, table, tokens, start, partial, committed: false }
    }
}

impl KvStore for PagedKv<'_> {
    fn held(&self) -> usize {
        self.start
    }

    fn reserve(&mut self, t: usize) -> Result<()> {
        if t != self.tokens.len() || self.table.len() != self.start {
            return Err(Error::Invalid(format!(
                "paged kv: a pass of {t} tokens was given {} token ids, on a table of {} tokens made at {}",
                self.tokens.len(),
                self.table.len(),
                self.start
            )));
        }
        self.pool.append(self.table, self.tokens)?;
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let blocks = self.table.blocks();
        backend::write_kv(&mut self.pool.layer_mut(layer)?, blocks, self.start, k, v)?;
        let held = self.start + self.tokens.len();
        backend::paged_attention(q, &self.pool.layer(layer)?, blocks, held, Some(self.start), scale)
    }

    fn commit(&mut self, _t: usize) -> Result<()> {
        self.committed = true;
        self.pool.publish(self.table)
    }
}

impl Drop for PagedKv<'_> {
    fn drop(&mut self) {
        if !self.committed && self.table.len() > self.start {
            // Only this table's own references change, which cannot fail; and a destructor has nowhere to
            // report to anyway.
            let _ = self.pool.rollback(self.table, self.start, self.partial);
            let _ = self.pool.take_copies();
        }
    }
}

/// One sequence of a `PagedBatch`.
struct BatchSeq<'a> {
    table: &'a mut BlockTable,
    tokens: &'a [u32],
    start: usize,
    partial: Option<(usize, u32)>,
    committed: bool,
}

/// A `BatchKvStore` over several block tables in one pool, for one batched pass (`Qwen2::forward_batch`):
/// `PagedKv` for many sequences at once. Sequence `i` runs `seqs[i].1` (the ids of its new positions) on
/// table `seqs[i].0`. The same rollback rule holds per sequence: a table whose pass did not commit returns
/// to its old length when the batch is dropped.
///
/// With `row_invariant`, attention runs in groups of at most `backend::ATTENTION_ROW_INVARIANT_MAX_ROWS`
/// query rows over the table's keys gathered once, so each row is computed exactly as it would be in any
/// other chunking of the same sequence (pair it with `row_invariant` in `Qwen2::forward_batch`).
pub struct PagedBatch<'a> {
    pool: &'a mut BlockPool,
    seqs: Vec<BatchSeq<'a>>,
    row_invariant: bool,
}

impl<'a> PagedBatch<'a> {
    pub fn new(
        pool: &'a mut BlockPool,
        seqs: Vec<(&'a mut BlockTable, &'a [u32])>,
        row_invariant: bool,
    ) -> PagedBatch<'a> {
        let seqs = seqs
            .into_iter()
            .map(|(table, tokens)| {
                let start = table.len();
                let partial = pool.partial_last(table);
                BatchSeq { table, tokens, start, partial, committed: false }
            })
            .collect();
        PagedBatch { pool, seqs, row_invariant }
    }
}

impl BatchKvStore for PagedBatch<'_> {
    fn seqs(&self) -> usize {
        self.seqs.len()
    }

    fn held(&self, seq: usize) -> usize {
        self.seqs.get(seq).map_or(0, |s| s.start)
    }

    fn reserve(&mut self, seq: usize, t: usize) -> Result<()> {
        let n = self.seqs.len();
        let PagedBatch { pool, seqs, .. } = self;
        let Some(s) = seqs.get_mut(seq) else {
            return Err(Error::Invalid(format!("paged batch: sequence {seq} of {n}")));
        };
        if t != s.tokens.len() || s.table.len() != s.start {
            return Err(Error::Invalid(format!(
                "paged batch: sequence {seq}: a pass of {t} tokens was given {} token ids, on a table of {} tokens \
                 made at {}",
                s.tokens.len(),
                s.table.len(),
                s.start
            )));
        }
        pool.append(s.table, s.tokens)?;
        Ok(())
    }

    fn attend(&mut self, seq: usize, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let n = self.seqs.len();
        let Some(s) = self.seqs.get(seq) else {
            return Err(Error::Invalid(format!("paged batch: sequence {seq} of {n}")));
        };
        let blocks = s.table.blocks();
        backend::write_kv(&mut self.pool.layer_mut(layer)?, blocks, s.start, k, v)?;
        let held = s.start + s.tokens.len();
        let group = backend::ATTENTION_ROW_INVARIANT_MAX_ROWS;
        let rows = q.shape().first().copied().unwrap_or(0);
        if !self.row_invariant || rows <= group {
            return backend::paged_attention(q, &self.pool.layer(layer)?, blocks, held, Some(s.start), scale);
        }
        let (keys, values) = backend::cpu::paged_attention::gather_kv(&self.pool.layer(layer)?, blocks, held)?;
        let row: usize = q.shape()[1..].iter().product();
        let mut out = Vec::with_capacity(rows * row);
        for (g, part) in q.f32s()?.chunks(group * row).enumerate() {
            let mut shape = q.shape().to_vec();
            shape[0] = part.len() / row;
            let qg = Tensor::from_f32(shape, part.to_vec())?;
            out.extend_from_slice(backend::attention(&qg, &keys, &values, Some(s.start + g * group), scale)?.f32s()?);
        }
        Tensor::from_f32(q.shape().to_vec(), out)
    }

    fn blocks(&self, seq: usize) -> Result<&[u32]> {
        let n = self.seqs.len();
        match self.seqs.get(seq) {
            Some(s) => Ok(s.table.blocks()),
            None => Err(Error::Invalid(format!("paged batch: sequence {seq} of {n}"))),
        }
    }

    fn take_copies(&mut self) -> Vec<(u32, u32)> {
        self.pool.take_copies()
    }

    fn commit(&mut self, seq: usize, _t: usize) -> Result<()> {
        let n = self.seqs.len();
        let Some(s) = self.seqs.get_mut(seq) else {
            return Err(Error::Invalid(format!("paged batch: sequence {seq} of {n}")));
        };
        s.committed = true;
        self.pool.publish(s.table)
    }
}

impl Drop for PagedBatch<'_> {
    fn drop(&mut self) {
        // Copies nobody took belong to a pass that failed: the rollback below releases their targets (which
        // may then go to another table), so they must never be performed later.
        self.pool.take_copies();
        for s in &mut self.seqs {
            if !s.committed && s.table.len() > s.start {
                // As in `PagedKv`: only this table's references change.
                let _ = self.pool.rollback(s.table, s.start, s.partial);
            }
        }
    }
}
