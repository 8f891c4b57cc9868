//! The config's choices as types: each is parsed (from the file, a `--set`
//! override or a string in code) in one place, [`FromStr`], and a wrong
//! value is refused with the choices there are. The key path is added by
//! the loader (`train.device: unknown device "tpu": use cpu, cuda or auto`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The one message for a value that is not among a choice's names:
/// `unknown device "tpu": use cpu, cuda or auto`.
pub fn unknown_choice(what: &str, got: &str, names: &[&str]) -> String {
    let list = match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    format!("unknown {what} {got:?}: use {list}")
}

/// A config choice: an enum written as one of its lowercase names.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every choice, in the order the docs list them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name a config writes.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.iter().copied().find(|c| c.name() == s).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|c| c.name()).collect();
                    unknown_choice($what, s, &names)
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.name() == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

choice! {
    /// `train.device`: where the model trains.
    pub enum DeviceChoice ("device") {
        /// The CPU.
        #[default]
        Cpu = "cpu",
        /// A CUDA GPU (an error without one): the worker takes the GPU
        /// `LOCAL_RANK` modulo the visible devices.
        Cuda = "cuda",
        /// That GPU when libtorch sees one, else the CPU.
        Auto = "auto",
    }
}

choice! {
    /// `train.precision`: the forward pass's arithmetic.
    pub enum Precision ("precision") {
        /// Everything in fp32.
        #[default]
        Fp32 = "fp32",
        /// Matrix multiplies and attention in bfloat16 (as
        /// `torch.autocast(dtype=torch.bfloat16)`), with fp32 master weights,
        /// LayerNorm, residual stream, loss and optimizer.
        Bf16 = "bf16",
    }
}

choice! {
    /// `parallel.backend`: which collectives the ranks run.
    pub enum BackendChoice ("backend") {
        /// NCCL for CUDA tensors when NCCL is usable, else tcp.
        #[default]
        Auto = "auto",
        /// Host memory (CUDA tensors are staged through it).
        Tcp = "tcp",
        /// NCCL, CUDA tensors only; an error where NCCL can't run.
        Nccl = "nccl",
    }
}

choice! {
    /// `parallel.algorithm`: the collective algorithm.
    pub enum AlgorithmChoice ("algorithm") {
        /// Picked per call from the message size and the world.
        #[default]
        Auto = "auto",
        Ring = "ring",
        Tree = "tree",
        Doubling = "doubling",
        /// Node-aware: rings within each host, then across hosts.
        Hierarchical = "hierarchical",
    }
}

choice! {
    /// `parallel.transport`: how host-memory ranks reach each other.
    pub enum TransportChoice ("transport") {
        /// Shared memory on one host, TCP between hosts.
        #[default]
        Auto = "auto",
        /// TCP with every peer, also on this host.
        Tcp = "tcp",
        /// Shared memory with every peer (every worker on one host).
        Shm = "shm",
    }
}

choice! {
    /// `recovery.mode`: what a worker's failure costs the job.
    pub enum RecoveryMode ("recovery mode") {
        /// In place: the survivors keep their processes and memory, only
        /// the failed rank starts again and takes its state from a peer.
        #[default]
        Peer = "peer",
        /// Every worker stops and the job restarts from the newest
        /// checkpoint on disk.
        Restart = "restart",
    }
}

/// `parallel.zero_stage`: how gradients and optimizer state are spread over
/// the ranks. Written as its number, `0`, `1` or `2`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ZeroStage {
    /// 0: all-reduce gradients; every rank keeps all optimizer state (DDP).
    #[default]
    Ddp,
    /// 1: reduce-scatter gradients; each rank keeps 1/N of the optimizer state.
    Zero1,
    /// 2: as ZeRO-1, and only the rank's shard of the reduced gradient is kept.
    Zero2,
}

impl ZeroStage {
    pub fn as_u8(self) -> u8 {
        match self {
            ZeroStage::Ddp => 0,
            ZeroStage::Zero1 => 1,
            ZeroStage::Zero2 => 2,
        }
    }
}

impl TryFrom<u64> for ZeroStage {
    type Error = String;
    fn try_from(n: u64) -> Result<Self, String> {
        match n {
            0 => Ok(ZeroStage::Ddp),
            1 => Ok(ZeroStage::Zero1),
            2 => Ok(ZeroStage::Zero2),
            n => Err(format!("{n} is not supported: use 0 (DDP), 1 or 2")),
        }
    }
}

impl fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u8())
    }
}

impl Serialize for ZeroStage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.as_u8())
    }
}

impl<'de> Deserialize<'de> for ZeroStage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        u64::try_from(n)
            .map_err(|_| format!("{n} is not supported: use 0 (DDP), 1 or 2"))
            .and_then(ZeroStage::try_from)
            .map_err(serde::de::Error::custom)
    }
}

/// `launch.nnodes` and `--nnodes`: `N` nodes, or `MIN:MAX` to go on with
/// fewer after a loss. A config writes `nnodes = 2` or `nnodes = "1:4"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRange {
    pub min: u32,
    pub max: u32,
}

impl NodeRange {
    /// Exactly `n` nodes.
    pub fn exactly(n: u32) -> Self {
        Self { min: n, max: n }
    }

    /// Whether the job may run on fewer nodes than it started with.
    pub fn is_elastic(self) -> bool {
        self.min != self.max
    }
}

impl fmt::Display for NodeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_elastic() {
            write!(f, "{}:{}", self.min, self.max)
        } else {
            write!(f, "{}", self.min)
        }
    }
}

impl FromStr for NodeRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |part: &str| -> Result<u32, String> {
            match part.trim().parse::<u32>() {
                Ok(0) => Err(format!(
                    "--nnodes {s:?}: the number of nodes must be at least 1"
                )),
                Ok(n) => Ok(n),
                Err(_) => Err(format!(
                    "--nnodes {s:?}: expected a number of nodes N or a range MIN:MAX (e.g. 2 or 1:4)"
                )),
            }
        };
        let range = match s.split_once(':') {
            Some((min, max)) => Self {
                min: parse(min)?,
                max: parse(max)?,
            },
            None => Self::exactly(parse(s)?),
        };
        if range.min > range.max {
            return Err(format!("--nnodes {s:?}: MIN is larger than MAX"));
        }
        Ok(range)
    }
}

impl Serialize for NodeRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_elastic() {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_u32(self.min)
        }
    }
}

impl<'de> Deserialize<'de> for NodeRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Count(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_their_names_and_list_them_otherwise() {
        for c in DeviceChoice::ALL {
            assert_eq!(c.name().parse::<DeviceChoice>(), Ok(*c));
        }
        assert_eq!(
            "tpu".parse::<DeviceChoice>().unwrap_err(),
            "unknown device \"tpu\": use cpu, cuda or auto"
        );
        assert_eq!(
            "bcube".parse::<AlgorithmChoice>().unwrap_err(),
            "unknown algorithm \"bcube\": use auto, ring, tree, doubling or hierarchical"
        );
        assert_eq!(unknown_choice("x", "y", &["a"]), "unknown x \"y\": use a");
    }

    #[test]
    fn node_range_parses_and_rejects() {
        assert_eq!("2".parse::<NodeRange>().unwrap(), NodeRange::exactly(2));
        assert_eq!(
            "1:4".parse::<NodeRange>().unwrap(),
            NodeRange { min: 1, max: 4 }
        );
        assert!("0".parse::<NodeRange>().unwrap_err().contains("at least 1"));
        assert!(
            "4:1"
                .parse::<NodeRange>()
                .unwrap_err()
                .contains("MIN is larger")
        );
        assert!("x".parse::<NodeRange>().unwrap_err().contains("MIN:MAX"));
        assert_eq!(NodeRange { min: 1, max: 4 }.to_string(), "1:4");
    }
}
