//! Training data: byte-level text, nanoGPT `.bin` token files (memory-mapped
//! u16), and a synthetic learnable task.
//!
//! Every data set is cut into windows of `block_size + 1` tokens (inputs and
//! the targets shifted by one). The order in which windows are visited is a
//! pure function of `(seed, epoch, sample index)`: sample `g` of the run is
//! window `permute(g % n, n, key(seed, epoch))` with `epoch = g / n`. A step
//! consumes `world × batch` consecutive sample indices, and rank `r` takes the
//! `r`-th run of `batch` of them, so ranks read disjoint windows and N ranks
//! with batch B read exactly the samples one process with batch N·B reads.
//! The only state is the number of samples consumed ([`Loader::position`]),
//! which a checkpoint records.

use std::path::Path;
use std::sync::Arc;

use cohort_configs::{DataConfig, DataKind};
use tch::{Device, Tensor};

use crate::TrainError;

/// Vocabulary of the synthetic task when `model.vocab_size` is 0.
pub const SYNTHETIC_VOCAB: usize = 64;

/// One micro-batch: `inputs` and `targets` are `[batch, block_size]` i64.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
}

/// Which part of the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

enum Tokens {
    Bytes(Vec<u8>),
    U16(memmap2::Mmap),
    /// `next[t]` is the token after `t`: a fixed permutation drawn from the seed.
    Synthetic {
        next: Vec<u16>,
        seed: u64,
    },
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::Bytes(b) => b.len(),
            Tokens::U16(m) => m.len() / 2,
            Tokens::Synthetic { .. } => usize::MAX,
        }
    }

    fn get(&self, i: usize) -> i64 {
        match self {
            Tokens::Bytes(b) => i64::from(b[i]),
            Tokens::U16(m) => i64::from(u16::from_le_bytes([m[2 * i], m[2 * i + 1]])),
            Tokens::Synthetic { .. } => unreachable!("synthetic windows are generated, not read"),
        }
    }
}

/// A data set split into train and validation windows.
pub struct Dataset {
    tokens: Tokens,
    vocab_size: usize,
    block_size: usize,
    /// Token ranges of the two splits (unused for synthetic data).
    train: std::ops::Range<usize>,
    val: std::ops::Range<usize>,
}

impl Dataset {
    /// Opens the data set `cfg` describes. `vocab_size` is `model.vocab_size`
    /// (0 = the data's own: 256 for text, 65,536 for `.bin`... see
    /// [`Dataset::vocab_size`]).
    pub fn open(
        cfg: &DataConfig,
        block_size: usize,
        vocab_size: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let need_path = || -> Result<&Path, TrainError> {
            cfg.path.as_deref().ok_or_else(|| {
                TrainError::Config(format!(
                    "data.kind = \"{}\" needs data.path (the file to read)",
                    if cfg.kind == DataKind::Text {
                        "text"
                    } else {
                        "bin"
                    }
                ))
            })
        };
        let tokens = match cfg.kind {
            DataKind::Synthetic => {
                let vocab = if vocab_size == 0 {
                    SYNTHETIC_VOCAB
                } else {
                    vocab_size
                };
                if vocab > usize::from(u16::MAX) + 1 {
                    return Err(TrainError::Config(format!(
                        "model.vocab_size = {vocab} is too large for synthetic data (at most 65536)"
                    )));
                }
                let mut next: Vec<u16> = (0..vocab).map(|t| t as u16).collect();
                let mut rng = SplitMix::new(seed ^ 0x5eed_da7a);
                for i in (1..next.len()).rev() {
                    let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                    next.swap(i, j);
                }
                Tokens::Synthetic { next, seed }
            }
            DataKind::Text => {
                let path = need_path()?;
                let bytes = std::fs::read(path).map_err(|source| TrainError::DataRead {
                    path: path.to_owned(),
                    source,
                })?;
                Tokens::Bytes(bytes)
            }
            DataKind::Bin => {
                let path = need_path()?;
                let file = std::fs::File::open(path).map_err(|source| TrainError::DataRead {
                    path: path.to_owned(),
                    source,
                })?;
                // SAFETY: the file is opened read-only; a training data file
                // being truncated under a running job is outside our contract
                // (as in nanoGPT's np.memmap).
                let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| {
                    TrainError::DataRead {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                if map.len() % 2 != 0 {
                    return Err(invalid(path, "odd length: not a file of u16 tokens"));
                }
                Tokens::U16(map)
            }
        };
        let data_vocab = match &tokens {
            Tokens::Bytes(_) => 256,
            Tokens::U16(_) => usize::from(u16::MAX) + 1,
            Tokens::Synthetic { next, .. } => next.len(),
        };
        let vocab_size = if vocab_size == 0 {
            data_vocab
        } else {
            vocab_size
        };
        let mut ds = Dataset {
            tokens,
            vocab_size,
            block_size,
            train: 0..0,
            val: 0..0,
        };
        if let Some(path) = cfg
            .path
            .as_deref()
            .filter(|_| cfg.kind != DataKind::Synthetic)
        {
            let n = ds.tokens.len();
            let n_val = (n as f64 * cfg.val_fraction) as usize;
            ds.train = 0..n - n_val;
            ds.val = n - n_val..n;
            if ds.train.len() < block_size + 1 {
                return Err(invalid(
                    path,
                    &format!(
                        "{} training tokens, fewer than one window of model.block_size + 1 = {}: use a larger file or a smaller block_size",
                        ds.train.len(),
                        block_size + 1
                    ),
                ));
            }
            if cfg.val_fraction > 0.0 && ds.val.len() < block_size + 1 {
                return Err(invalid(
                    path,
                    &format!(
                        "the held-out {} of the file ({} tokens) is shorter than one window ({}): raise data.val_fraction or set it to 0",
                        cfg.val_fraction,
                        ds.val.len(),
                        block_size + 1
                    ),
                ));
            }
            if vocab_size < data_vocab && cfg.kind == DataKind::Text {
                return Err(TrainError::Config(format!(
                    "model.vocab_size = {vocab_size} is smaller than the 256 byte values of text data: use 0 or at least 256"
                )));
            }
        }
        Ok(ds)
    }

    /// Vocabulary size the model needs.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Distinct windows in `split` (synthetic data: unbounded).
    pub fn windows(&self, split: Split) -> u64 {
        let range = match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        };
        match self.tokens {
            Tokens::Synthetic { .. } => u64::MAX,
            _ => (range.len().saturating_sub(1) / self.block_size) as u64,
        }
    }

    /// Writes window `w` of `split` (`block_size + 1` tokens) into `out`.
    /// `shift` moves the window grid (a per-epoch jitter in `0..block_size`).
    fn window(&self, split: Split, w: u64, shift: usize, out: &mut Vec<i64>) {
        let n = self.block_size + 1;
        match &self.tokens {
            Tokens::Synthetic { next, seed } => {
                let tag = if split == Split::Train { 0 } else { 1 << 63 };
                let mut t = (SplitMix::new(seed ^ w ^ tag).next_u64() % next.len() as u64) as usize;
                for _ in 0..n {
                    out.push(t as i64);
                    t = usize::from(next[t]);
                }
            }
            tokens => {
                let range = if split == Split::Train {
                    &self.train
                } else {
                    &self.val
                };
                let start = range.start + w as usize * self.block_size;
                // The shifted window must stay inside the split.
                let start = if start + shift + n <= range.end {
                    start + shift
                } else {
                    start
                };
                out.extend((start..start + n).map(|i| tokens.get(i)));
            }
        }
    }
}

fn invalid(path: &Path, reason: &str) -> TrainError {
    TrainError::DataInvalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Hands each rank its part of every global batch.
pub struct Loader {
    data: Arc<Dataset>,
    seed: u64,
    rank: usize,
    world: usize,
    batch: usize,
    /// Training samples consumed by the whole job (all ranks).
    position: u64,
}

impl Loader {
    pub fn new(data: Arc<Dataset>, seed: u64, rank: usize, world: usize, batch: usize) -> Self {
        Loader {
            data,
            seed,
            rank,
            world,
            batch,
            position: 0,
        }
    }

    /// Training samples consumed by the whole job so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Continues from `position` (from a checkpoint; valid for any world size).
    pub fn set_position(&mut self, position: u64) {
        self.position = position;
    }

    /// This rank's next training micro-batch; advances the job's position by
    /// `world × batch`.
    pub fn next_batch(&mut self, device: Device) -> Batch {
        let n = self.data.windows(Split::Train);
        let first = self.position + (self.rank * self.batch) as u64;
        let mut rows = Vec::with_capacity(self.batch * (self.data.block_size + 1));
        for g in first..first + self.batch as u64 {
            let (epoch, i) = (g / n, g % n);
            let key =
                SplitMix::new(self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64();
            let w = if n == u64::MAX { g } else { permute(i, n, key) };
            let shift = (key % self.data.block_size as u64) as usize;
            self.data.window(Split::Train, w, shift, &mut rows);
        }
        self.position += (self.world * self.batch) as u64;
        self.to_batch(rows, device)
    }

    /// This rank's part of evaluation batch `k`: the validation windows in
    /// order, the same for every evaluation. `None` when there is no
    /// held-out split.
    pub fn eval_batch(&self, k: usize, device: Device) -> Option<Batch> {
        let n = self.data.windows(Split::Val);
        if n == 0 {
            return None;
        }
        let first = ((k * self.world + self.rank) * self.batch) as u64;
        let mut rows = Vec::with_capacity(self.batch * (self.data.block_size + 1));
        for g in first..first + self.batch as u64 {
            self.data.window(Split::Val, g % n, 0, &mut rows);
        }
        Some(self.to_batch(rows, device))
    }

    fn to_batch(&self, rows: Vec<i64>, device: Device) -> Batch {
        let t = self.data.block_size as i64;
        let all = Tensor::from_slice(&rows).view([self.batch as i64, t + 1]);
        Batch {
            inputs: upload(all.narrow(1, 0, t).contiguous(), device),
            targets: upload(all.narrow(1, 1, t).contiguous(), device),
        }
    }
}

/// A host tensor on `device`. To a GPU through page-locked memory, without
/// waiting: the copy is ordered on the stream before the kernels that read
/// it, and libtorch's caching host allocator keeps the pinned block until
/// the copy is done. A pageable copy would make the host wait for the GPU.
fn upload(t: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => t
            .pin_memory(device)
            .to_device_(device, t.kind(), true, false),
        _ => t.to_device(device),
    }
}

/// A bijection of `0..n` keyed by `key`: a 4-round Feistel network on the
/// smallest even power-of-two domain holding `n`, with cycle walking (the
/// domain is at most 4n, so a few rounds on average). O(1) memory, so a
/// billion-window file is shuffled without a permutation table.
pub fn permute(i: u64, n: u64, key: u64) -> u64 {
    assert!(i < n, "permute: index {i} out of 0..{n}");
    if n == 1 {
        return 0;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut x = i;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = SplitMix::new(r ^ key.rotate_left(16 * round as u32) ^ round).next_u64() & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

/// SplitMix64: a tiny, fast, well-mixed generator for seeds and indices.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 64, 100, 1000, 4097] {
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = permute(i, n, 42) as usize;
                assert!(!seen[j], "n={n}: {j} hit twice");
                seen[j] = true;
            }
        }
    }

    #[test]
    fn ranks_read_what_one_big_batch_reads() {
        let cfg = DataConfig::default();
        let data = Arc::new(Dataset::open(&cfg, 8, 0, 1).unwrap());
        let mut one = Loader::new(data.clone(), 1, 0, 1, 6);
        let big = one.next_batch(Device::Cpu).inputs;
        let parts: Vec<Tensor> = (0..3)
            .map(|r| {
                Loader::new(data.clone(), 1, r, 3, 2)
                    .next_batch(Device::Cpu)
                    .inputs
            })
            .collect();
        assert!(Tensor::cat(&parts, 0).equal(&big));
    }

    #[test]
    fn bin_files_are_little_endian_u16_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        let tokens: Vec<u16> = (0..41u16).map(|t| t * 1000).collect();
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(&path, bytes).unwrap();
        let cfg = DataConfig {
            kind: DataKind::Bin,
            path: Some(path.clone()),
            val_fraction: 0.0,
        };
        let data = Arc::new(Dataset::open(&cfg, 4, 0, 1).unwrap());
        assert_eq!(data.vocab_size(), 65536);
        assert_eq!(data.windows(Split::Train), 10);
        let b = Loader::new(data, 1, 0, 1, 10).next_batch(Device::Cpu);
        let inputs = Vec::<i64>::try_from(b.inputs.reshape([-1])).unwrap();
        let targets = Vec::<i64>::try_from(b.targets.reshape([-1])).unwrap();
        for (x, y) in inputs.iter().zip(&targets) {
            assert_eq!(x % 1000, 0);
            assert_eq!(y - x, 1000, "targets are the inputs shifted by one token");
        }
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        let err = Dataset::open(&cfg, 4, 0, 1).err().unwrap().to_string();
        assert!(err.contains("odd length"), "{err}");
    }

    #[test]
    fn text_epochs_visit_every_window_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(
            &path,
            (0..=255u8).cycle().take(4 * 50 + 1).collect::<Vec<_>>(),
        )
        .unwrap();
        let cfg = DataConfig {
            kind: DataKind::Text,
            path: Some(path),
            val_fraction: 0.0,
        };
        let data = Arc::new(Dataset::open(&cfg, 4, 0, 1).unwrap());
        assert_eq!(data.windows(Split::Train), 50);
        let mut loader = Loader::new(data, 3, 0, 1, 10);
        let mut firsts: Vec<i64> = Vec::new();
        for _ in 0..5 {
            let b = loader.next_batch(Device::Cpu);
            firsts.extend(Vec::<i64>::try_from(b.inputs.select(1, 0)).unwrap());
        }
        assert_eq!(loader.position(), 50);
        // Windows start 4 apart (plus one shift per epoch, below 4), at most
        // at 4 * 49 + 3 < 256: one epoch's first tokens are all distinct.
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 50);
    }
}
