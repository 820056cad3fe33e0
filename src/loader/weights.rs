//! The checkpoint as a model weight source: tensors point into the shards' memory maps (zero copy) when
//! aligned, so loading a bf16 model costs no second copy of its weights.

use std::sync::Arc;

use super::Checkpoint;
use crate::model::Weights;
use crate::tensor::Tensor;
use crate::{Error, Result};

impl Weights for Checkpoint {
    fn weight(&self, name: &str) -> Result<Tensor> {
        let (e, shard) = self.entry(name).ok_or_else(|| Error::Tensor {
            file: self.dir().display().to_string(),
            tensor: name.to_string(),
            msg: "not in the checkpoint".into(),
        })?;
        let dtype = e.dtype;
        Tensor::mapped(e.shape.clone(), Arc::clone(&shard.mmap) as Arc<dyn crate::tensor::ByteSource>, e.start, dtype)
    }
}
