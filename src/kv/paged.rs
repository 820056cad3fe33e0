//! The paged cache as the model sees it: one sequence's block table in a shared pool, for one forward pass.

use super::{BlockPool, BlockTable};
use crate::backend;
use crate::model::llm::KvStore;
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
    committed: bool,
}

impl<'a> PagedKv<'a> {
    pub fn new(pool: &'a mut BlockPool, table: &'a mut BlockTable, tokens: &'a [u32]) -> PagedKv<'a> {
        let start = table.len();
        PagedKv { pool, table, tokens, start, committed: false }
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
            // Truncating to a shorter length only releases blocks this table holds, which cannot fail; and
            // a destructor has nowhere to report to anyway.
            let _ = self.pool.truncate(self.table, self.start);
        }
    }
}
