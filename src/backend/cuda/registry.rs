//! The kernel images build.rs embedded (`$OUT_DIR/kernels_index.rs`), loaded into a context once. An sm_90
//! device gets the sm_90a cubin (no JIT at start-up, and `a` features); any other device, or a cubin the
//! driver refuses, gets the sm_80 PTX, which the driver JIT-compiles for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::{guarded, Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels_index.rs"));

/// Which embedded image a device with this compute capability loads first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    Sm90aCubin,
    Sm80Ptx,
}

pub fn preferred_image(compute_capability: (i32, i32)) -> Image {
    match compute_capability {
        (9, 0) => Image::Sm90aCubin,
        _ => Image::Sm80Ptx,
    }
}

pub struct Registry {
    modules: HashMap<&'static str, (Arc<CudaModule>, Image)>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl Registry {
    /// Loads every embedded module into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>, compute_capability: (i32, i32)) -> Result<Self> {
        let first = preferred_image(compute_capability);
        let mut modules = HashMap::new();
        for &(name, ptx, cubin) in KERNELS {
            let from_ptx =
                || guarded(&format!("load module {name} (sm_80 PTX)"), || ctx.load_module(Ptx::from_src(ptx)));
            let loaded = match first {
                Image::Sm90aCubin => {
                    match guarded(&format!("load module {name} (sm_90a cubin)"), || {
                        ctx.load_module(Ptx::from_binary(cubin.to_vec()))
                    }) {
                        Ok(m) => (m, Image::Sm90aCubin),
                        Err(_) => (from_ptx()?, Image::Sm80Ptx),
                    }
                }
                Image::Sm80Ptx => (from_ptx()?, Image::Sm80Ptx),
            };
            modules.insert(name, loaded);
        }
        Ok(Registry { modules, functions: Mutex::new(HashMap::new()) })
    }

    /// The image each module was loaded from, for `selfcheck` and `bench` to print.
    pub fn image_of(&self, module: &str) -> Option<Image> {
        self.modules.get(module).map(|(_, img)| *img)
    }

    /// The kernel `function` of `module`, looked up once and cached.
    pub fn function(&self, module: &'static str, function: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&(module, function)) {
            return Ok(f.clone());
        }
        let (m, _) = self.modules.get(module).ok_or_else(|| Error::MissingModule { module: module.to_string() })?;
        let f = guarded(&format!("load function {module}::{function}"), || m.load_function(function))?;
        cache.insert((module, function), f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_embeds_ptx_and_an_elf_cubin() {
        assert!(!KERNELS.is_empty(), "build.rs embedded no kernels");
        for &(name, ptx, cubin) in KERNELS {
            assert!(ptx.contains(".target sm_80"), "{name}: PTX lacks `.target sm_80`");
            assert!(ptx.contains(".version 9.0"), "{name}: PTX ISA is not 9.0 (nvcc 13.0); the driver may refuse it");
            assert_eq!(&cubin[..4], b"\x7fELF", "{name}: sm_90a image is not an ELF cubin");
        }
    }

    #[test]
    fn rmsnorm_module_exports_both_kernels() {
        let (_, ptx, _) = KERNELS.iter().find(|k| k.0 == "rmsnorm").expect("module rmsnorm embedded");
        for f in ["rmsnorm_bf16", "add_rmsnorm_bf16"] {
            assert!(ptx.contains(&format!(".entry {f}(")), "rmsnorm PTX lacks entry {f}");
        }
    }

    #[test]
    fn only_sm90_prefers_the_cubin() {
        assert_eq!(preferred_image((9, 0)), Image::Sm90aCubin);
        for cc in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)] {
            assert_eq!(preferred_image(cc), Image::Sm80Ptx, "{cc:?}");
        }
    }
}
