//! Executors: *where* the uncached shards of a map stage compute.
//!
//! The scheduler decides *what* runs (keys, cache, early cutoff) whatever the executor; an
//! executor only computes the shards the scheduler found missing. `local` computes them on threads
//! of this process (the scheduler's own loop). `slurm` packs them into tasks of a job array whose
//! tasks run `ladle worker` on cluster nodes over a store every node sees, and ingests the
//! receipts the workers leave ([`task`], [`worker`], [`slurm`]). Outputs are byte-identical
//! whatever the executor: the same stage code maps the same shard bytes.

pub mod slurm;
pub mod task;
pub mod worker;

use std::sync::Arc;

/// Where a run computes its map stages' shards.
#[derive(Debug, Clone, Default)]
pub enum Executor {
    /// Threads of this process, bounded by `-j`.
    #[default]
    Local,
    /// Job arrays on a Slurm cluster.
    Slurm(Arc<slurm::SlurmOptions>),
}
