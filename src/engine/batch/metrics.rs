//! What the engine counts, for `/metrics`: monotonic counters, gauges of the current state and latency
//! histograms, all updated by the engine thread and read by anyone (atomics; the histograms behind a
//! short lock). `render` writes them in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A latency histogram with fixed upper bounds in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistState>,
}

#[derive(Clone, Default)]
struct HistState {
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

/// Time to first token: from the request's arrival to its first generated token.
const TTFT_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Time between two tokens of one sequence.
const ITL_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, state: Mutex::new(HistState { counts: vec![0; bounds.len() + 1], sum: 0.0 }) }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.counts[i] += 1;
        s.sum += seconds;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).counts.iter().sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&s.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += s.counts.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}\n{name}_sum {}\n{name}_count {cum}", s.sum);
    }
}

/// Every engine counter and gauge. Counters only grow; gauges are set after each step.
pub struct EngineMetrics {
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub preemptions: AtomicU64,
    /// Requests admitted for the first time, and those of them that found cached prefix blocks.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Images whose features came from the vision cache, and images / tiles run through the tower.
    pub vision_hits: AtomicU64,
    pub vision_images_encoded: AtomicU64,
    pub vision_tiles_encoded: AtomicU64,
    pub steps: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// Blocks held by live sequences (a block shared by several counts once).
    pub kv_blocks_used: AtomicU64,
    /// Blocks kept only for prefix reuse: reclaimable at any time, so counted as free for admission.
    pub kv_blocks_cached: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        EngineMetrics {
            prompt_tokens: z(),
            generation_tokens: z(),
            finished_stop: z(),
            finished_length: z(),
            cancelled: z(),
            failed: z(),
            preemptions: z(),
            prefix_queries: z(),
            prefix_hits: z(),
            prefix_hit_tokens: z(),
            vision_hits: z(),
            vision_images_encoded: z(),
            vision_tiles_encoded: z(),
            steps: z(),
            running: z(),
            waiting: z(),
            kv_blocks_used: z(),
            kv_blocks_cached: z(),
            kv_blocks_total: z(),
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
        }
    }
}

/// Adds one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl EngineMetrics {
    /// Appends every metric, prefixed `facellm_`, in the Prometheus text exposition format.
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP facellm_{name} {help}\n# TYPE facellm_{name} {kind}\nfacellm_{name} {v}");
        };
        one("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", get(&self.prompt_tokens));
        one("generation_tokens_total", "counter", "Tokens generated.", get(&self.generation_tokens));
        one(
            "preemptions_total",
            "counter",
            "Sequences preempted for KV blocks (recomputed later).",
            get(&self.preemptions),
        );
        one(
            "prefix_cache_queries_total",
            "counter",
            "Requests looked up in the KV prefix cache.",
            get(&self.prefix_queries),
        );
        one("prefix_cache_hits_total", "counter", "Requests that reused cached KV blocks.", get(&self.prefix_hits));
        one(
            "prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens whose KV came from the prefix cache.",
            get(&self.prefix_hit_tokens),
        );
        one("vision_cache_hits_total", "counter", "Images whose features came from the cache.", get(&self.vision_hits));
        one(
            "vision_images_encoded_total",
            "counter",
            "Images run through the vision tower.",
            get(&self.vision_images_encoded),
        );
        one(
            "vision_tiles_encoded_total",
            "counter",
            "Tiles run through the vision tower.",
            get(&self.vision_tiles_encoded),
        );
        one("engine_steps_total", "counter", "Batched forward passes.", get(&self.steps));
        one("running_sequences", "gauge", "Sequences in the running batch.", get(&self.running));
        one("queue_depth", "gauge", "Requests waiting for a place in the batch.", get(&self.waiting));
        one("kv_blocks_used", "gauge", "KV blocks held by live sequences.", get(&self.kv_blocks_used));
        one(
            "kv_blocks_cached",
            "gauge",
            "KV blocks kept only for prefix reuse (reclaimable).",
            get(&self.kv_blocks_cached),
        );
        one("kv_blocks_total", "gauge", "KV blocks in the pool.", get(&self.kv_blocks_total));
        let _ = writeln!(
            out,
            "# HELP facellm_sequences_finished_total Sequences that ended, by reason.\n\
             # TYPE facellm_sequences_finished_total counter\n\
             facellm_sequences_finished_total{{reason=\"stop\"}} {}\n\
             facellm_sequences_finished_total{{reason=\"length\"}} {}\n\
             facellm_sequences_finished_total{{reason=\"cancelled\"}} {}\n\
             facellm_sequences_finished_total{{reason=\"error\"}} {}",
            get(&self.finished_stop),
            get(&self.finished_length),
            get(&self.cancelled),
            get(&self.failed)
        );
        self.ttft.render(out, "facellm_time_to_first_token_seconds", "From arrival to the first generated token.");
        self.itl.render(out, "facellm_time_per_output_token_seconds", "Between two tokens of one sequence.");
    }
}
